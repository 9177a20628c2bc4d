"""Timing: how a case's milliseconds are measured, its inputs made and its error checked.

Warm-up calls are excluded (compilation, autotuning, allocator growth), every sample ends with a
device sync (`block_until_ready` / `torch.cuda.synchronize`), each sample runs `inner`
back-to-back calls that rotate over several distinct random input sets (so caches do not flatter
a repeated buffer; never zeros), and we report the median with p10/p90 over many samples, per
call.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.device import torch_cuda
from benchmarks.settings import Settings


@dataclass
class Timing:
    """Per-call milliseconds over samples."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    samples: int
    inner: int

    def as_dict(self) -> dict[str, float | int]:
        return {
            "median_ms": round(self.median_ms, 5),
            "p10_ms": round(self.p10_ms, 5),
            "p90_ms": round(self.p90_ms, 5),
            "samples": self.samples,
            "inner": self.inner,
        }


def time_fn(
    fn: Callable[..., Any],
    inputs: Sequence[tuple],
    sync: Callable[[Any], None],
    settings: Settings,
) -> Timing:
    """Time `fn(*inputs[i])` rotating over `inputs`; `sync(out)` waits for the device.

    With `settings.warm_only`, `fn` runs once and the timing is NaN."""
    if settings.warm_only:
        sync(fn(*inputs[0]))
        return Timing(float("nan"), float("nan"), float("nan"), 0, 0)
    n = len(inputs)
    out = None
    for i in range(settings.warmup):
        out = fn(*inputs[i % n])
    sync(out)
    t0 = time.perf_counter()
    out = fn(*inputs[0])
    sync(out)
    one_ms = max((time.perf_counter() - t0) * 1e3, 1e-3)
    inner = max(1, min(200, round(settings.sample_ms / one_ms)))
    per_call = []
    for _ in range(settings.samples):
        t0 = time.perf_counter()
        for i in range(inner):
            out = fn(*inputs[i % n])
        sync(out)
        per_call.append((time.perf_counter() - t0) * 1e3 / inner)
    p10, med, p90 = np.percentile(per_call, [10, 50, 90])
    return Timing(float(med), float(p10), float(p90), settings.samples, inner)


@jax.jit
def _leaf_rel_error(a: jax.Array, b: jax.Array) -> jax.Array:
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    return jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-30)


def max_rel_error(out: Any, ref: Any) -> float:
    """Largest |out - ref| over the leaves of two same-structured pytrees, each relative to that
    leaf's largest |ref|; computed on the device."""
    errors = [
        _leaf_rel_error(a, b)
        for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref), strict=True)
        if b.size
    ]
    return max((float(e) for e in errors), default=0.0)


def jax_sync(out: Any) -> None:
    jax.block_until_ready(out)


def torch_sync(_: Any) -> None:
    import torch

    torch.cuda.synchronize()


def random_inputs(shape: Sequence[int], dtype, count: int, seed: int = 0) -> list[jax.Array]:
    """`count` distinct standard-normal device arrays (never zeros)."""
    keys = jax.random.split(jax.random.key(seed), count)
    return [jax.random.normal(k, tuple(shape), jnp.float32).astype(dtype) for k in keys]


def torch_compile(module: Any) -> Any:
    """`torch.compile(module)` after clearing Dynamo's per-code caches, so compiles of earlier
    cases never count against its recompile limit (the compiled artifacts stay cached)."""
    import torch

    torch._dynamo.reset()
    return torch.compile(module)


def copy_bandwidth(settings: Settings) -> dict[str, float]:
    """Device-to-device copy bandwidth in GB/s (bytes read + bytes written), JAX and torch."""
    if settings.warm_only:
        return {"gbps": float("nan")}
    size = 2**20 if settings.quick else 2**30  # elements of bf16: 2 GiB moved per copy
    xs = random_inputs((size,), jnp.bfloat16, 2, seed=123)
    copy = jax.jit(lambda x: -x)  # one read, one write; a plain copy can be elided
    t = time_fn(copy, [(x,) for x in xs], jax_sync, settings)
    out = {"jax_gbps": 2 * size * 2 / t.median_ms / 1e6}
    torch = torch_cuda()
    if torch is not None:
        a = [torch.randn(size, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
        b = torch.empty_like(a[0])
        t = time_fn(lambda x: b.copy_(x), [(x,) for x in a], torch_sync, settings)
        out["torch_gbps"] = 2 * size * 2 / t.median_ms / 1e6
        del a, b
    out["gbps"] = max(out.values())
    return out
