"""PyTorch keys of a Flax module: its layout's tables walked down to the Flax variables."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from flax import nnx

from flax_attention.convert.layouts import KEY_MAPS, LAYOUTS
from flax_attention.convert.tables import LEAF_PARAMS, Child, Table, Transform


@dataclass(frozen=True)
class Binding:
    """One PyTorch tensor name bound to one Flax variable."""

    variable: nnx.Variable
    transform: Transform

    def torch_shape(self) -> tuple[int, ...]:
        zeros = np.broadcast_to(np.float32(0), self.variable.get_value().shape)
        return tuple(self.transform.to_torch(zeros).shape)


def check_layout(layout: str) -> None:
    """ValueError naming the supported layouts unless `layout` is one of them."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} is not supported; choose one of {list(LAYOUTS)}")


def table_for(module: nnx.Module, layout: str) -> Table:
    """The table of `module`'s class (or nearest base that has one) in `layout`."""
    key_map = KEY_MAPS.get(layout, {})
    for cls in type(module).__mro__:
        if cls in key_map:
            return key_map[cls]
    known = sorted(
        name for name, tables in KEY_MAPS.items() for c in tables if isinstance(module, c)
    )
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
