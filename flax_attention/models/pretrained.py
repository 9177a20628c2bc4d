"""Pretrained PyTorch weights for registered models: local files and the Hugging Face Hub.

A weights source is a local file (`.pth`, `.pth.tar`, `.bin`, `.safetensors`, `.npz`) or
`hf-hub:ORG/REPO[/FILE]`, resolved by `huggingface_hub` through its cache (`HF_HUB_CACHE`,
`HF_HOME`) and downloaded only when not cached and not offline (`HF_HUB_OFFLINE=1`). Without
FILE the repository's `model.safetensors`, else its `pytorch_model.bin`, is used (timm's names).

`HUB_WEIGHTS` lists Hub weights known to fit a registered model, with their key layout; the
first entry of a model is its default (`create_model(name, pretrained=True)`). The authors of
CBAM/BAM (Jongchan/attention-module) and senet.pytorch publish their checkpoints elsewhere
("Pretrained weights" in docs/models.md says where); pass the downloaded file as
`pretrained=PATH`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx

from flax_attention.convert import (
    StateDictMismatchError,
    load_torch_checkpoint,
    load_torch_state_dict,
)

HF_HUB_PREFIX = "hf-hub:"
# File names timm uses on the Hub (timm/models/_hub.py), in order of preference.
HUB_FILES = ("model.safetensors", "pytorch_model.bin")
HEAD_KEYS = ("fc.weight", "fc.bias")
# huggingface_hub's exceptions, as the one-line error words them.
_REASONS = {
    "LocalEntryNotFoundError": "not cached, Hub not reached",
    "RemoteEntryNotFoundError": "no such file in the repository",
    "RepositoryNotFoundError": "no such repository (or it is private)",
}


class WeightsNotFoundError(FileNotFoundError):
    """A weights source names no local file and the Hub could not provide one."""


@dataclass(frozen=True)
class HubWeights:
    """Weights on the Hugging Face Hub that fit registered model `model` in `layout`."""

    model: str
    repo: str
    layout: str
    origin: str

    @property
    def source(self) -> str:
        """The `hf-hub:` spec of these weights."""
        return f"{HF_HUB_PREFIX}{self.repo}"


HUB_WEIGHTS: tuple[HubWeights, ...] = (
    *(
        HubWeights(f"resnet{d}", f"timm/resnet{d}.tv_in1k", "official", "torchvision V1 weights")
        for d in (18, 34, 50, 101, 152)
    ),
    HubWeights("resnet50", "timm/resnet50.tv2_in1k", "official", "torchvision V2 weights"),
    HubWeights("resnet50", "timm/resnet50.a1_in1k", "official", "timm, ResNet strikes back A1"),
    HubWeights("seresnet50", "timm/seresnet50.a1_in1k", "timm", "timm, ResNet strikes back A1"),
    HubWeights("seresnet50", "timm/seresnet50.ra2_in1k", "timm", "timm, RandAugment RA2"),
)


@dataclass(frozen=True)
class Weights:
    """A read weights file: where it came from, its key layout and its tensors (numpy)."""

    source: str
    path: Path
    layout: str
    state_dict: dict[str, np.ndarray]


def pretrained_weights(name: str) -> list[HubWeights]:
    """The known Hub weights of registered model `name`, the default first (may be empty)."""
    return [w for w in HUB_WEIGHTS if w.model == name]


def parse_hub_spec(spec: str) -> tuple[str, str | None]:
    """`hf-hub:ORG/REPO[/FILE]` -> (`ORG/REPO`, `FILE` or None); ValueError if malformed."""
    parts = spec.removeprefix(HF_HUB_PREFIX).split("/", 2)
    if not spec.startswith(HF_HUB_PREFIX) or len(parts) < 2 or not all(parts):
        raise ValueError(f"{spec!r} is not a Hub weights spec; expected hf-hub:ORG/REPO[/FILE]")
    return f"{parts[0]}/{parts[1]}", parts[2] if len(parts) == 3 else None


def resolve_weights(
    source: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None
) -> Path:
    """The local file of a weights source: a path (which must exist) or `hf-hub:ORG/REPO[/FILE]`.

    Hub files come from the `huggingface_hub` cache (`cache_dir`, default `HF_HUB_CACHE`) or
    are downloaded into it unless offline (`HF_HUB_OFFLINE=1`). Raises `WeightsNotFoundError`
    (a FileNotFoundError) in one line naming the source and the cache when there is no file.
    """
    if not str(source).startswith(HF_HUB_PREFIX):
        path = Path(source)
        if not path.is_file():
            raise WeightsNotFoundError(f"no weights file at {path}")
        return path
    repo, filename = parse_hub_spec(str(source))
    from huggingface_hub import constants, errors, hf_hub_download  # only for Hub sources

    reasons, local_only = [], False
    for name in (filename,) if filename else HUB_FILES:
        try:
            path = hf_hub_download(repo, name, cache_dir=cache_dir, local_files_only=local_only)
            return Path(path)
        except (errors.HfHubHTTPError, errors.EntryNotFoundError, OSError) as err:
            reasons.append(f"{name}: {_REASONS.get(type(err).__name__, type(err).__name__)}")
            # Hub not reached: look for the other file in the cache only (no second wait).
            local_only = local_only or isinstance(err, errors.LocalEntryNotFoundError)
    cache = cache_dir or constants.HF_HUB_CACHE
    offline = ", HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else ""
    raise WeightsNotFoundError(
        f"{source}: no weights file in the Hugging Face cache {cache} nor on the Hub "
        f"({'; '.join(reasons)}{offline}); download it where the Hub is reachable, or pass a "
        "local file"
    )


def read_weights(name: str, pretrained: bool | str | os.PathLike, default_layout: str) -> Weights:
    """Resolve and read the weights `pretrained` names for model `name` (True: its default).

    The layout is that of a known Hub entry for the source, else `default_layout` (the model's).
    """
    known = pretrained_weights(name)
    if pretrained is True:
        if not known:
            with_weights = sorted({w.model for w in HUB_WEIGHTS})
            raise ValueError(
                f"no default pretrained weights for {name!r} (Hub weights are known for "
                f"{', '.join(with_weights)}); pass pretrained=PATH to a checkpoint file (the "
                "'Pretrained weights' of docs/models.md lists where the authors publish theirs)"
            )
        source = known[0].source
    elif isinstance(pretrained, str | os.PathLike):
        source = os.fspath(pretrained)
    else:
        raise ValueError(
            f"pretrained must be True, a file path or 'hf-hub:ORG/REPO[/FILE]'; got {pretrained!r}"
        )
    repo = parse_hub_spec(source)[0] if source.startswith(HF_HUB_PREFIX) else None
    layout = {w.repo: w.layout for w in known}.get(repo, default_layout)
    path = resolve_weights(source)
    return Weights(source, path, layout, load_torch_checkpoint(path))


def load_weights(model: nnx.Module, name: str, weights: Weights) -> None:
    """Fill `model` (registered as `name`) from `weights` and put it in eval mode.

    Every tensor must fit, except a classifier (`fc.*`) of another width than the model's, which
    keeps its initialisation. Raises ValueError naming the file and every key that does not fit.
    """
    state_dict: dict[str, Any] = weights.state_dict
    head = state_dict.get("fc.weight")
    try:
        if head is None or head.shape[0] == model.fc.out_features:
            load_torch_state_dict(model, state_dict, layout=weights.layout)  # strict
        else:  # another classifier width: load the backbone only
            backbone = {k: v for k, v in state_dict.items() if k not in HEAD_KEYS}
            report = load_torch_state_dict(model, backbone, layout=weights.layout, strict=False)
            if report.unexpected or report.mismatched or set(report.missing) - set(HEAD_KEYS):
                raise StateDictMismatchError(model, weights.layout, report)
    except StateDictMismatchError as err:
        raise ValueError(f"{weights.source} ({weights.path}) does not fit {name}: {err}") from err
    model.eval()
