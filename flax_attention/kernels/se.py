"""Fused channel gate (SE, CBAM's ChannelGate): `y = x * g(pools_HW(x))` with a custom VJP.

Forward: one pass pools x over H*W (sum and max), the tiny MLP runs in XLA with the module's
own layers, one pass applies the gate. Backward: one pass reduces `sum_HW(dy * x)` and counts
the max pool's ties, the MLP's VJP runs in XLA, one pass writes
`dx = dy * g + d_sum + d_max * [x == max] / ties`. Seven tensor reads and writes against five at
the minimal bytes: the pool is needed before any output can be written, and `sum_HW(dy * x)`
before any dx.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from flax_attention.kernels import passes
from flax_attention.kernels.executors import Problem

# excite(module, pooled_sum (N, C) f32, pooled_max (N, C) f32, hw) -> gate (N, C) f32.
Excite = Callable[[nnx.Module, jax.Array, jax.Array, int], jax.Array]


def se_excite(module: nnx.Module, pooled_sum: jax.Array, pooled_max: jax.Array, hw: int):
    """`SE.gate` from the H*W sum: sigmoid(fc2(relu(fc1(mean))))."""
    s = (pooled_sum / hw).astype(module.dtype)
    return jax.nn.sigmoid(module.fc2(jax.nn.relu(module.fc1(s))).astype(jnp.float32))


def round_to(v: jax.Array, dtype) -> jax.Array:
    """`v` rounded to `dtype`, kept in float32."""
    return v.astype(dtype).astype(jnp.float32)


def channel_gate_fused(
    module: nnx.Module, x: jax.Array, *, executor: Any, excite: Excite = se_excite
) -> jax.Array:
    """`x * excite(module, pools of x)` on NHWC x (N, H, W, C) by fused passes -> same shape."""
    n, h, w, c = x.shape
    problem = Problem(n, h * w, c, x.dtype)
    graphdef, state = nnx.split(module)

    def run(p, **inputs):
        return executor(p, problem, **inputs)

    def gate_of(state, pooled_sum, pooled_max):
        return excite(nnx.merge(graphdef, state), pooled_sum, pooled_max, h * w)

    @jax.custom_vjp
    def fused(state, x3):
        return fwd(state, x3)[0]

    def fwd(state, x3):
        pools = run(passes.CHANNEL_POOL, x=x3)
        gate, vjp = jax.vjp(gate_of, state, pools["sum"], pools["max"])
        gate = round_to(gate, x3.dtype)  # as the XLA path, which multiplies in the compute dtype
        y = run(passes.APPLY_CHANNEL_GATE, x=x3, cg=gate)["y"]
        return y, (x3, gate, pools["max"], vjp)

    def bwd(res, dy):
        x3, gate, chan_max, vjp = res
        grads = run(passes.CHANNEL_GATE_GRADS, x=x3, dy=dy, chan_max=chan_max)
        d_state, d_sum, d_max = vjp(grads["d_cg"])
        pool_grads = {"d_sum": d_sum, "chan_max": chan_max, "d_chan_max": d_max / grads["ties"]}
        dx = run(passes.CHANNEL_GATE_INPUT_GRAD, x=x3, dy=dy, cg=gate, **pool_grads)["dx"]
        return d_state, dx

    fused.defvjp(fwd, bwd)
    return fused(state, x.reshape(n, h * w, c)).reshape(x.shape)
