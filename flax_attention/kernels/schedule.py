"""What the fused gates' schedules (se.py, cbam.py) share: running a pass over one NHWC input,
rounding a gate as the XLA path does, and a custom-VJP function from its forward and backward."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from flax_attention.kernels.executors import Problem
from flax_attention.kernels.passes import Pass

RunPass = Callable[..., dict[str, jax.Array]]  # run(pass, **inputs) -> the pass's outputs


def pass_runner(executor: Any, x: jax.Array) -> RunPass:
    """`run(pass, **inputs)`: `pass` by `executor` on NHWC `x` (N, H, W, C) seen as (N, H*W, C)."""
    n, h, w, c = x.shape
    problem = Problem(n, h * w, c, x.dtype)

    def run(p: Pass, **inputs: jax.Array) -> dict[str, jax.Array]:
        return executor(p, problem, **inputs)

    return run


def round_to(v: jax.Array, dtype: Any) -> jax.Array:
    """`v` rounded to `dtype`, kept in float32."""
    return v.astype(dtype).astype(jnp.float32)


def custom_vjp(fwd: Callable[..., tuple[Any, Any]], bwd: Callable[..., tuple]) -> Callable:
    """A `jax.custom_vjp` function whose value is `fwd(*args)[0]`, with `fwd` and `bwd` as its
    forward (value, residuals) and backward (residuals, cotangent) -> argument cotangents."""

    @jax.custom_vjp
    def f(*args):
        return fwd(*args)[0]

    f.defvjp(fwd, bwd)
    return f
