"""Choosing how a gate runs: `impl` names and the executor of each on each platform.

- `"xla"`: the module's jax.numpy path, differentiated by JAX (the reference).
- `"xla_passes"`: the fused schedule of kernels/se.py and kernels/cbam.py (custom VJP, one pass
  per tensor read) with every pass run by XLA on whole tensors.
- `"pallas"`: the same schedule with Pallas kernels: Mosaic GPU (`plgpu.kernel`) on CUDA GPUs,
  `pl.pallas_call` on TPUs, `pl.pallas_call` in the interpreter on CPU.
- `"auto"`: per platform, gate and H*W, the path measured fastest (`AUTO`), else `"xla"`. In a
  residual block in training mode an SE, or CBAM's channel gate, on `"auto"` runs fused with
  the BatchNorm before it (layers.norm_gate) where that choice is `"xla"`.
"""

from __future__ import annotations

import math
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

# Platform -> gate -> ((H * W, the impl whose forward+backward was fastest there), ...) for
# `impl="auto"`: batch 128, bf16, the ResNet-50 stage sizes, spatial convs as the library conv.
# Written from benchmarks/results/nvidia-h200/modules.json by `python -m benchmarks.auto_table`
# (tests/test_benchmarks.py checks the two agree). The entry whose H*W is nearest (in ratio)
# decides; platforms and gates without one, and shapes the chosen executor does not take, run
# "xla".
AUTO: dict[str, dict[str, tuple[tuple[int, str], ...]]] = {
    "gpu": {
        "se": ((3136, "xla"), (784, "xla"), (196, "xla"), (49, "xla")),
        "cbam": ((3136, "xla"), (784, "xla"), (196, "xla"), (49, "xla")),
    },
}


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


def resolve(impl: str, problem: Problem, gate: str) -> str:
    """The concrete impl of `gate` ("se", "cbam") for `problem` on the default platform:
    "auto" becomes the `AUTO` choice for the nearest measured H*W (see `AUTO`)."""
    check_impl(impl)
    if impl != "auto":
        return impl
    choice = measured_choice(AUTO, gate, problem.hw) or "xla"
    if choice != "xla" and executor(choice).unsupported(problem) is not None:
        return "xla"
    return choice


def measured_choice(
    table: dict[str, dict[str, tuple[tuple[int, str], ...]]], gate: str, hw: int
) -> str | None:
    """From a platform -> gate -> ((H * W, choice), ...) table of measurements (`AUTO`,
    `layers.tap_convs.AUTO`), this platform's choice for `gate` at the measured H * W nearest
    `hw` in ratio; None where the platform or gate has no entry."""
    rows = table.get(platform(), {}).get(gate)
    if not rows:
        return None
    return min(rows, key=lambda row: abs(math.log(row[0] / hw)))[1]


def fused_executor(impl: str, x: jax.Array, gate: str) -> Any | None:
    """The executor that runs `gate`'s `impl` on NHWC `x`, or None for the module's XLA path."""
    n, h, w, c = x.shape
    chosen = resolve(impl, Problem(n, h * w, c, x.dtype), gate)
    return None if chosen == "xla" else executor(chosen)
