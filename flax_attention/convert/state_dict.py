"""Load PyTorch state_dicts into Flax NNX modules and export them back."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from flax_attention.convert.keymap import bindings, check_layout

IGNORED_SUFFIXES = ("num_batches_tracked",)
STRIPPED_PREFIX = "module."


@dataclass
class LoadReport:
    """What a load matched: PyTorch keys loaded, missing, unexpected and mis-shaped."""

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def __str__(self) -> str:
        lines = [f"loaded {len(self.loaded)} tensors"]
        lines += [f"missing key: {k}" for k in self.missing]
        lines += [f"unexpected key: {k}" for k in self.unexpected]
        lines += [
            f"shape mismatch: {k}: expected {exp} (PyTorch layout), got {got}"
            for k, exp, got in self.mismatched
        ]
        return "\n".join(lines)


class StateDictMismatchError(ValueError):
    """A strict load found missing, unexpected or mis-shaped keys; `.report` lists them all."""

    def __init__(self, module: nnx.Module, layout: str, report: LoadReport):
        self.report = report
        super().__init__(
            f"state_dict does not match {type(module).__name__} in the {layout!r} layout "
            f"({len(report.missing)} missing, {len(report.unexpected)} unexpected, "
            f"{len(report.mismatched)} mis-shaped):\n{report}"
        )


def to_numpy(value: Any) -> np.ndarray:
    """A numpy copy of a numpy array, JAX array or torch tensor (bfloat16 is widened).

    Always a copy: a torch tensor updated in place later must not change what was loaded.
    """
    if hasattr(value, "detach"):
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            value = value.float()
        return value.numpy().copy()
    return np.array(value, copy=True)


def strip_data_parallel_prefix(key: str) -> str:
    """`key` without its DataParallel `module.` prefixes (`module.module.fc` -> `fc`)."""
    while key.startswith(STRIPPED_PREFIX):
        key = key.removeprefix(STRIPPED_PREFIX)
    return key


def clean_state_dict(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Drop `num_batches_tracked`, strip DataParallel `module.` prefixes, convert to numpy."""
    out = {}
    for key, value in state_dict.items():
        if key.endswith(IGNORED_SUFFIXES):
            continue
        out[strip_data_parallel_prefix(key)] = to_numpy(value)
    return out


def check_values(state_dict: Mapping[str, np.ndarray], keys: list[str]) -> None:
    """ValueError naming every tensor of `keys` that is not floating point or holds NaN/inf."""
    problems = []
    for key in keys:
        value = state_dict[key]
        if not jnp.issubdtype(value.dtype, jnp.floating):
            problems.append(f"{key}: dtype {value.dtype} is not floating point")
        elif not np.isfinite(value).all():
            problems.append(
                f"{key}: {int(np.size(value) - np.isfinite(value).sum())} NaN/inf values"
            )
    if problems:
        raise ValueError(
            f"state_dict tensors cannot be loaded as weights ({len(problems)}): "
            + "; ".join(problems)
        )


def load_torch_state_dict(
    module: nnx.Module,
    state_dict: Mapping[str, Any],
    *,
    layout: str = "official",
    strict: bool = True,
) -> LoadReport:
    """Fill `module` in place from PyTorch `state_dict` (key -> numpy array or torch tensor).

    Conv weights OIHW become HWIO, Linear (out, in) becomes (in, out), BatchNorm running
    statistics become `mean`/`var`. With `strict=True` nothing is written unless every key
    matches; otherwise one `StateDictMismatchError` lists every missing, unexpected and
    mis-shaped key. With `strict=False` the matching keys are loaded and the report returned.
    Either way, a tensor to load that is not floating point or holds NaN/inf is refused (one
    ValueError naming them all) before anything is written.
    """
    check_layout(layout)
    expected = bindings(module, layout)
    given = clean_state_dict(state_dict)
    report = LoadReport(
        missing=sorted(expected.keys() - given.keys()),
        unexpected=sorted(given.keys() - expected.keys()),
    )
    for key in sorted(expected.keys() & given.keys()):
        want, got = expected[key].torch_shape(), tuple(given[key].shape)
        if want == got:
            report.loaded.append(key)
        else:
            report.mismatched.append((key, want, got))
    if strict and not report.ok:
        raise StateDictMismatchError(module, layout, report)
    check_values(given, report.loaded)
    for key in report.loaded:
        binding = expected[key]
        value = binding.transform.to_flax(given[key])
        binding.variable.set_value(
            jnp.array(value, dtype=binding.variable.get_value().dtype, copy=True)
        )
    return report


def to_torch_state_dict(module: nnx.Module, *, layout: str = "official") -> dict[str, np.ndarray]:
    """Numpy arrays under PyTorch names and layouts (BatchNorm running statistics included):
    writable, C-contiguous copies (`torch.from_numpy` takes them without a warning)."""
    check_layout(layout)
    return {
        key: np.array(
            binding.transform.to_torch(np.asarray(binding.variable.get_value())), order="C"
        )
        for key, binding in bindings(module, layout).items()
    }
