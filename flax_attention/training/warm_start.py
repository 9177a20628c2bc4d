"""The weights a training run starts from (`--pretrained`): a saved model directory or what
`create_model(name, pretrained=...)` takes. Above the registry and the saved-model format,
which it both reads."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx

from flax_attention import checkpoint
from flax_attention.models.pretrained import (
    HF_HUB_PREFIX,
    WeightsNotFoundError,
    load_weights,
    read_weights,
)
from flax_attention.models.registry import get_spec


def load_pretrained(model: nnx.Module, name: str, source: bool | str | os.PathLike) -> None:
    """Fill `model`, a new model registered as `name`, with the weights of `source`: a saved
    model directory (`flax_attention.checkpoint`), or what `create_model(name, pretrained=...)`
    takes (a weights file, `hf-hub:ORG/REPO[/FILE]`, True for the default Hub weights).

    Every variable must fit (same model, same shapes), except a classifier (`fc`) of another
    width, which keeps `model`'s initialisation. Raises FileNotFoundError for a source that does
    not exist and ValueError for one that does not fit; the first line of either names the source.
    """
    if isinstance(source, str | os.PathLike) and not str(source).startswith(HF_HUB_PREFIX):
        if not Path(source).exists():
            raise WeightsNotFoundError(f"no model directory or weights file at {source}")
        if Path(source).is_dir():
            _load_saved_model(model, name, Path(source))
            return
    load_weights(model, name, read_weights(name, source, get_spec(name).layout))


def _load_saved_model(model: nnx.Module, name: str, directory: Path) -> None:
    """Fill `model` (registered as `name`) from the arrays of model directory `directory`."""
    saved = checkpoint.restore(name, directory)  # refuses another model's directory
    target = nnx.to_pure_dict(nnx.state(model))
    want, got = nnx.traversals.flatten_mapping(target), _flat_variables(saved)
    head = {path for path in want if path[0] == "fc"}
    unfit = sorted(
        ".".join(map(str, path))
        for path in want.keys() | got.keys()
        if path not in head
        and (path not in got or path not in want or _shape(want[path]) != _shape(got[path]))
    )
    if unfit:
        listed = ", ".join(unfit[:3]) + (f" and {len(unfit) - 3} more" if len(unfit) > 3 else "")
        raise ValueError(f"{directory} does not fit {name}; arrays that differ: {listed}")
    for path, value in got.items():
        if _shape(value) == _shape(want[path]):
            want[path] = np.asarray(value).astype(want[path].dtype)
    state = nnx.state(model)
    nnx.replace_by_pure_dict(state, nnx.traversals.unflatten_mapping(want))
    nnx.update(model, state)


def _flat_variables(model: nnx.Module) -> dict[tuple, Any]:
    return nnx.traversals.flatten_mapping(nnx.to_pure_dict(nnx.state(model)))


def _shape(value: Any) -> tuple[int, ...]:
    return tuple(np.shape(value))
