"""Choosing how a gate runs: `impl` names and the executor of each on each platform.

- `"xla"`: the module's jax.numpy path, differentiated by JAX (the reference).
- `"xla_passes"`: the fused schedule of kernels/se.py and kernels/cbam.py (custom VJP, one pass
  per tensor read) with every pass run by XLA on whole tensors.
- `"pallas"`: the same schedule with Pallas kernels: Mosaic GPU (`plgpu.kernel`) on CUDA GPUs,
  `pl.pallas_call` on TPUs, `pl.pallas_call` in the interpreter on CPU.
- `"auto"`: per platform and shape, the path measured faster (`AUTO`), else `"xla"`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

from flax_attention.kernels.executors import MosaicGpu, PallasCall, Problem, Xla

IMPLS = ("xla", "xla_passes", "pallas", "auto")


def _tpu() -> dict[str, Any]:
    from jax.experimental.pallas import tpu as pltpu

    semantics = ("parallel", "parallel", "parallel")
    return {"compiler_params": pltpu.CompilerParams(dimension_semantics=semantics)}


EXECUTORS: dict[tuple[str, str], Callable[[], Any]] = {
    ("xla_passes", "cpu"): Xla,
    ("xla_passes", "gpu"): Xla,
    ("xla_passes", "tpu"): Xla,
    ("pallas", "cpu"): lambda: PallasCall(lambda: {"interpret": True}),
    ("pallas", "gpu"): MosaicGpu,
    ("pallas", "tpu"): lambda: PallasCall(_tpu),
}

# Platform -> impls `"auto"` tries in order; the first whose executor takes the shape wins.
# benchmarks/results/nvidia-h100-80gb-hbm3/modules.json (jax 0.11.2) holds the measurements.
AUTO: dict[str, tuple[str, ...]] = {"cpu": ("xla",), "gpu": ("xla",), "tpu": ("xla",)}


def check_impl(impl: str) -> None:
    """Raise a ValueError naming `impl` when it is not one of `IMPLS`."""
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r} is not supported; choose one of {list(IMPLS)}")


def platform() -> str:
    backend = jax.default_backend()
    return "gpu" if backend == "cuda" else backend


def executor(impl: str) -> Any:
    """The executor of a fused `impl` ("xla_passes", "pallas") on the default platform."""
    key = (impl, platform())
    if key not in EXECUTORS:
        raise ValueError(f"impl={impl!r} has no executor on {key[1]!r}")
    return EXECUTORS[key]()


def resolve(impl: str, problem: Problem) -> str:
    """The concrete impl for `problem` on the default platform: "auto" becomes the first impl
    of `AUTO` whose executor takes the shape."""
    check_impl(impl)
    if impl != "auto":
        return impl
    for choice in AUTO.get(platform(), ("xla",)):
        if choice == "xla" or executor(choice).unsupported(problem) is None:
            return choice
    return "xla"


def fused_executor(impl: str, x: jax.Array) -> Any | None:
    """The executor that runs `impl` on NHWC `x`, or None for the module's XLA path."""
    n, h, w, c = x.shape
    chosen = resolve(impl, Problem(n, h * w, c, x.dtype))
    return None if chosen == "xla" else executor(chosen)
