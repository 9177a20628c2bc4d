"""What a PyTorch <-> Flax key-map table is made of.

A table lists, for one module, where each PyTorch layer lives in the Flax module:
`Layer(torch_name, flax_path, kind)` binds a parameterised PyTorch layer (its `weight`, `bias`,
running statistics) to a Flax leaf layer; `Child(torch_name, flax_path)` descends into a
submodule that has a table of its own. Tables are functions of the module instance so that
repeated parts (dilated convs, PSA branches, ResNet blocks) are listed by a comprehension.
A layout (`flax_attention.convert.layouts`) is a `KeyMap`: module class -> table.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
from flax import nnx


@dataclass(frozen=True)
class Transform:
    """A PyTorch tensor layout <-> Flax array layout pair of functions."""

    to_flax: Callable[[np.ndarray], np.ndarray]
    to_torch: Callable[[np.ndarray], np.ndarray]


IDENTITY = Transform(lambda a: a, lambda a: a)
LINEAR = Transform(lambda a: a.T, lambda a: a.T)  # (out, in) <-> (in, out)
CONV = Transform(  # OIHW <-> HWIO
    lambda a: a.transpose(2, 3, 1, 0),
    lambda a: a.transpose(3, 2, 0, 1),
)
CONV1X1_AS_LINEAR = Transform(  # 1x1 conv (out, in, 1, 1) <-> (in, out)
    lambda a: a[:, :, 0, 0].T,
    lambda a: a.T[:, :, None, None],
)

# What a PyTorch layer of each kind stores: (torch parameter, Flax attribute, transform).
LEAF_PARAMS: dict[str, tuple[tuple[str, str, Transform], ...]] = {
    "linear": (("weight", "kernel", LINEAR), ("bias", "bias", IDENTITY)),
    "conv": (("weight", "kernel", CONV), ("bias", "bias", IDENTITY)),
    "conv1x1_linear": (("weight", "kernel", CONV1X1_AS_LINEAR), ("bias", "bias", IDENTITY)),
    "bn": (
        ("weight", "scale", IDENTITY),
        ("bias", "bias", IDENTITY),
        ("running_mean", "mean", IDENTITY),
        ("running_var", "var", IDENTITY),
    ),
}


@dataclass(frozen=True)
class Layer:
    """A PyTorch layer `torch` (of `kind`, see LEAF_PARAMS) stored at Flax path `flax`."""

    torch: str
    flax: str
    kind: str


@dataclass(frozen=True)
class Child:
    """A PyTorch submodule `torch` that is the Flax submodule at `flax` (with its own table)."""

    torch: str
    flax: str


Entry = Layer | Child
Table = Callable[[nnx.Module], Iterable[Entry]]
KeyMap = dict[type, Table]  # one layout: module class -> its table
