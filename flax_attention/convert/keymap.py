"""Declarative PyTorch <-> Flax key maps: a registry of (module class, layout) -> table.

A table lists, for one module, where each PyTorch layer lives in the Flax module:
`Layer(torch_name, flax_path, kind)` binds a parameterised PyTorch layer (its `weight`, `bias`,
running statistics) to a Flax leaf layer; `Child(torch_name, flax_path)` descends into a
submodule that has a table of its own. Tables are functions of the module instance so that
repeated parts (dilated convs, PSA branches, ResNet blocks) are listed by a comprehension.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
from flax import nnx

LAYOUTS = ("official", "timm")


@dataclass(frozen=True)
class Transform:
    """A PyTorch tensor layout <-> Flax array layout pair of functions."""

    name: str
    to_flax: Callable[[np.ndarray], np.ndarray]
    to_torch: Callable[[np.ndarray], np.ndarray]


IDENTITY = Transform("identity", lambda a: a, lambda a: a)
LINEAR = Transform("linear (out,in)->(in,out)", lambda a: a.T, lambda a: a.T)
CONV = Transform(
    "conv OIHW->HWIO",
    lambda a: a.transpose(2, 3, 1, 0),
    lambda a: a.transpose(3, 2, 0, 1),
)
CONV1X1_AS_LINEAR = Transform(
    "1x1 conv (out,in,1,1)->(in,out)",
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
KEY_MAPS: dict[tuple[type, str], Table] = {}


def register(cls: type, layout: str) -> Callable[[Table], Table]:
    """Decorator: register `table(module)` as the key map of `cls` in `layout`."""

    def wrap(table: Table) -> Table:
        KEY_MAPS[(cls, layout)] = table
        return table

    return wrap


@dataclass(frozen=True)
class Binding:
    """One PyTorch tensor name bound to one Flax variable."""

    variable: nnx.Variable
    transform: Transform

    def torch_shape(self) -> tuple[int, ...]:
        zeros = np.broadcast_to(np.float32(0), self.variable.get_value().shape)
        return tuple(self.transform.to_torch(zeros).shape)


def check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} is not supported; choose one of {list(LAYOUTS)}")


def table_for(module: nnx.Module, layout: str) -> Table:
    """The registered table of `module`'s class (or nearest registered base) in `layout`."""
    for cls in type(module).__mro__:
        if (cls, layout) in KEY_MAPS:
            return KEY_MAPS[(cls, layout)]
    known = sorted(lay for c, lay in KEY_MAPS if isinstance(module, c))
    raise ValueError(
        f"{type(module).__name__} has no {layout!r} PyTorch layout"
        + (f"; it has {known}" if known else "; it cannot be converted")
    )


def bindings(module: nnx.Module, layout: str, prefix: str = "") -> dict[str, Binding]:
    """Every PyTorch key of `module` in `layout`, bound to the Flax variable it maps to."""
    out: dict[str, Binding] = {}
    for entry in table_for(module, layout)(module):
        target = _get_path(module, entry.flax)
        name = prefix + entry.torch
        if isinstance(entry, Child):
            out.update(bindings(target, layout, name + "."))
            continue
        for torch_param, flax_attr, transform in LEAF_PARAMS[entry.kind]:
            variable = getattr(target, flax_attr, None)
            if variable is not None:
                out[f"{name}.{torch_param}"] = Binding(variable, transform)
    return out


def _get_path(module: nnx.Module, path: str) -> nnx.Module:
    node = module
    for part in path.split("."):
        node = node[int(part)] if part.isdigit() else getattr(node, part)
    return node
