"""Choosing how a gate runs: `impl` names ("xla", "pallas", ...) and Pallas backends per platform.

`impl="xla"` is the reference path written in jax.numpy. `impl="pallas"` runs the fused kernels
of this package with the platform's Pallas backend: Mosaic GPU on CUDA GPUs, Mosaic TPU on TPUs,
the interpreter on CPU. `impl="pallas_triton"` forces the (deprecated from jax 0.11) Triton
backend on GPU. `impl="auto"` picks the path measured faster on the platform (`AUTO`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
from jax.experimental import pallas as pl

IMPLS = ("xla", "pallas", "pallas_triton", "auto")

# Platform -> impl that `impl="auto"` means there. benchmarks/results/nvidia-h100-80gb-hbm3
# (jax 0.11.2): the Mosaic GPU lowering of these kernels failed, the Triton one ran slower than
# XLA (SE fwd+bwd 0.65 vs 0.46 ms at 56x56x256), so auto is XLA everywhere measured.
AUTO: dict[str, str] = {"cpu": "xla", "gpu": "xla", "cuda": "xla", "tpu": "xla"}


def check_impl(impl: str) -> None:
    """Raise a ValueError naming `impl` when it is not one of `IMPLS`."""
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r} is not supported; choose one of {list(IMPLS)}")


def resolve(impl: str) -> str:
    """The concrete impl for the default backend: "auto" becomes the platform's choice."""
    check_impl(impl)
    if impl != "auto":
        return impl
    return AUTO.get(jax.default_backend(), "xla")


@dataclass(frozen=True)
class Backend:
    """Keyword arguments that make `pl.pallas_call` run on one backend."""

    kwargs: Callable[[], dict[str, Any]]


def _mosaic_gpu() -> dict[str, Any]:
    from jax.experimental.pallas import mosaic_gpu as plgpu

    return {"compiler_params": plgpu.CompilerParams()}


def _triton() -> dict[str, Any]:
    from jax.experimental.pallas import triton as pltriton

    return {"compiler_params": pltriton.CompilerParams(num_warps=4, num_stages=2)}


def _tpu() -> dict[str, Any]:
    from jax.experimental.pallas import tpu as pltpu

    return {"compiler_params": pltpu.CompilerParams(dimension_semantics=("parallel", "parallel"))}


BACKENDS: dict[tuple[str, str], Backend] = {
    ("pallas", "cpu"): Backend(lambda: {"interpret": True}),
    ("pallas", "gpu"): Backend(_mosaic_gpu),
    ("pallas", "cuda"): Backend(_mosaic_gpu),
    ("pallas", "tpu"): Backend(_tpu),
    ("pallas_triton", "cpu"): Backend(lambda: {"interpret": True}),
    ("pallas_triton", "gpu"): Backend(_triton),
    ("pallas_triton", "cuda"): Backend(_triton),
}


def pallas_call(
    kernel: Callable[..., None],
    impl: str,
    *,
    grid: tuple[int, int],
    in_specs: list[pl.BlockSpec],
    out_specs: list[pl.BlockSpec],
    out_shape: list[jax.ShapeDtypeStruct],
    interpret: Any = None,
) -> Callable[..., list[jax.Array]]:
    """`pl.pallas_call` with the backend arguments of `impl` on the default platform.

    `interpret` overrides the backend (e.g. `pltpu.InterpretParams()` to check TPU semantics).
    """
    if interpret is not None:
        kwargs: dict[str, Any] = {"interpret": interpret}
    else:
        key = (impl, jax.default_backend())
        if key not in BACKENDS:
            raise ValueError(f"impl={impl!r} has no Pallas backend on {key[1]!r}")
        kwargs = BACKENDS[key].kwargs()
    return pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        name=kernel.__name__,
        **kwargs,
    )
