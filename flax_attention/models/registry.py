"""Model registry: name -> ResNet spec (blocks, depth, attention, source, PyTorch layout)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any

import jax.numpy as jnp
from flax import nnx

from flax_attention.architectures.blocks import BasicBlock, Bottleneck, EPSABlock
from flax_attention.architectures.resnet import ResNet
from flax_attention.layers.common import Dtype
from flax_attention.models.pretrained import load_weights, read_weights

DEPTHS: dict[int, tuple[type, tuple[int, ...]]] = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
    101: (Bottleneck, (3, 4, 23, 3)),
    152: (Bottleneck, (3, 8, 36, 3)),
}


@dataclass(frozen=True)
class ModelSpec:
    """How to build a registered model and where its PyTorch weights come from.

    `layout` is the default `layout=` of `load_torch_state_dict` for checkpoints of `source`;
    `params` the number of parameters (nnx.Param, BatchNorm statistics excluded) with the default
    1000 classes, recorded so that listing builds nothing (tests check it against the model).
    """

    name: str
    block: type
    layers: tuple[int, ...]
    source: str
    layout: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    params: int | None = None

    def build(self, *, num_classes: int, rngs: nnx.Rngs, dtype: Dtype, **kw) -> ResNet:
        return ResNet(
            self.block,
            self.layers,
            num_classes=num_classes,
            rngs=rngs,
            dtype=dtype,
            **{**self.kwargs, **kw},
        )


def _family(prefix, params, source, layout, **kwargs) -> dict[str, ModelSpec]:
    """One spec per depth; `params` maps depth -> parameter count."""
    specs = {}
    for depth, count in params.items():
        block, layers = DEPTHS[depth]
        name = f"{prefix}{depth}"
        specs[name] = ModelSpec(name, block, layers, source, layout, kwargs, count)
    return specs


MODELS: dict[str, ModelSpec] = {
    **_family(
        "resnet",
        {18: 11_689_512, 34: 21_797_672, 50: 25_557_032, 101: 44_549_160, 152: 60_192_808},
        "torchvision",
        "official",
    ),
    **_family(
        "se_resnet",
        {18: 11_776_552, 34: 21_954_856, 50: 28_071_976, 101: 49_292_328, 152: 66_770_984},
        "senet.pytorch",
        "official",
        attention="se",
    ),
    **_family(
        "seresnet",
        {18: 11_779_624, 34: 21_960_416, 50: 28_088_024, 101: 49_326_872, 152: 66_821_848},
        "timm",
        "timm",
        attention="se_timm",
    ),
    **_family(
        "cbam_resnet",
        {18: 11_779_392, 34: 21_960_468, 50: 28_089_624, 101: 49_330_172},
        "Jongchan",
        "official",
        attention="cbam",
    ),
    **_family(
        "bam_resnet",
        {18: 11_712_503, 34: 21_820_663, 50: 25_915_099, 101: 44_907_227},
        "Jongchan",
        "official",
        stage_attention="bam",
    ),
    "epsanet50_small": ModelSpec(
        "epsanet50_small", EPSABlock, (3, 4, 6, 3), "murufeng", "official", {}, 22_561_715
    ),
    "epsanet101_small": ModelSpec(
        "epsanet101_small", EPSABlock, (3, 4, 23, 3), "murufeng", "official", {}, 38_900_279
    ),
}


def natural_key(name: str) -> tuple[str | int, ...]:
    """Sort key that orders the digits in a name as numbers: resnet18 < resnet34 < resnet101."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name))


def list_models() -> list[str]:
    """The registered model names, in natural order (resnet18 before resnet101)."""
    return sorted(MODELS, key=natural_key)


def get_spec(name: str) -> ModelSpec:
    """The spec of model `name`; a ValueError listing the names if it is unknown."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; registered models: {', '.join(list_models())}")
    return MODELS[name]


# Model arguments that no longer exist, with why: refused by name (saved model folders that
# record one are restored without it, flax_attention.checkpoint.restore).
REMOVED_ARGS: dict[str, str] = {
    "impl": "every SE and CBAM gate runs XLA, fused with the BatchNorm before it in training",
}


def refuse_removed_args(kw: dict[str, Any]) -> None:
    """Raise a one-line ValueError when `kw` names one of REMOVED_ARGS."""
    removed = sorted(REMOVED_ARGS.keys() & kw.keys())
    if removed:
        arg = removed[0]
        raise ValueError(f"model argument {arg!r} was removed ({REMOVED_ARGS[arg]}); drop it")


def create_model(
    name: str,
    *,
    num_classes: int = 1000,
    rngs: nnx.Rngs | None = None,
    dtype: Dtype = jnp.float32,
    pretrained: bool | str | os.PathLike | None = None,
    **kw: Any,
) -> ResNet:
    """Build registered model `name` (see `list_models()`); NHWC in, logits (N, num_classes) out.

    `rngs` seeds the initialisation (default `nnx.Rngs(0)`). Extra keywords go to `ResNet`
    (e.g. `param_dtype`, `in_channels`, `attention`); a removed one (`REMOVED_ARGS`: `impl`)
    is a ValueError naming it.

    `pretrained` loads PyTorch weights (see `flax_attention.models.pretrained`): a local file
    (`.pth`, `.pth.tar`, `.bin`, `.safetensors`, `.npz`), `"hf-hub:ORG/REPO[/FILE]"`, or `True`
    for the default Hub weights of `name` (the first of `pretrained_weights(name)`). The weights must fit
    exactly, except that a classifier of another width than `num_classes` is left at its random
    initialisation (fine-tuning). A pretrained model is returned in eval mode (`model.train()`
    to fine-tune); a randomly initialised one in training mode.
    """
    spec = get_spec(name)
    refuse_removed_args(kw)
    weights = None
    if pretrained is not None and pretrained is not False:  # read first: errors build nothing
        weights = read_weights(name, pretrained, spec.layout)
    rngs = nnx.Rngs(0) if rngs is None else rngs
    model = spec.build(num_classes=num_classes, rngs=rngs, dtype=dtype, **kw)
    if weights is not None:
        load_weights(model, name, weights)
    return model
