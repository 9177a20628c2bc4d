"""Fused channel gate (SE, CBAM's ChannelGate): `y = x * g(pools_HW(x))`, Pallas + custom VJP.

Forward: one pass pools x over H*W (sum and max, `channel_pool`), the tiny MLP runs in XLA with
the module's own layers, one pass applies the gate (`apply_gates`). Backward: one pass reduces
`sum_HW(dy * x)` (and counts the max pool's ties, `gate_grads`), the MLP's VJP runs in XLA, one
pass writes `dx = dy * g + d_sum + d_max * [x == max]` (`input_grad`). Seven passes over the
tensor against five at the minimal bytes: the pool is needed before any output can be written,
and an image does not fit on chip at ResNet-50's early stages.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from flax_attention.kernels.tiles import Tiling, apply_gates, channel_pool, gate_grads, input_grad

# excite(module, pooled_sum (N, C) f32, pooled_max (N, C) f32, hw) -> gate (N, C) f32.
Excite = Callable[[nnx.Module, jax.Array, jax.Array, int], jax.Array]


def se_excite(module: nnx.Module, pooled_sum: jax.Array, pooled_max: jax.Array, hw: int):
    """`SE.gate` from the H*W sum: sigmoid(fc2(relu(fc1(mean))))."""
    s = (pooled_sum / hw).astype(module.dtype)
    return jax.nn.sigmoid(module.fc2(jax.nn.relu(module.fc1(s))).astype(jnp.float32))


def channel_gate_pallas(
    module: nnx.Module,
    x: jax.Array,
    *,
    impl: str,
    excite: Excite = se_excite,
    uses_max: bool = False,
    interpret=None,
) -> jax.Array:
    """`x * excite(module, pools of x)` on NHWC x (N, H, W, C) by fused kernels -> same shape.

    `uses_max` says whether the gate depends on the H*W max (its backward then counts ties).
    """
    n, h, w, c = x.shape
    t = Tiling(n, h * w, c, x.dtype, interpret)
    graphdef, state = nnx.split(module)

    def gate_of(state, pooled_sum, pooled_max):
        return excite(nnx.merge(graphdef, state), pooled_sum, pooled_max, h * w)

    @jax.custom_vjp
    def fused(state, x3):
        return fwd(state, x3)[0]

    def fwd(state, x3):
        pooled_sum, pooled_max = channel_pool(t, impl, x3)
        gate, vjp = jax.vjp(gate_of, state, pooled_sum, pooled_max)
        y = apply_gates(t, impl, x3, gate, None)
        return y, (x3, gate, pooled_max if uses_max else None, vjp)

    def bwd(res, dy):
        x3, gate, pooled_max, vjp = res
        d_gate, _, count = gate_grads(t, impl, x3, dy, gate, chan_max=pooled_max)
        d_state, d_sum, d_max = vjp(d_gate)
        max_pool = (pooled_max, d_max / count) if uses_max else None
        return d_state, input_grad(t, impl, x3, dy, gate, d_sum, max_pool=max_pool)

    fused.defvjp(fwd, bwd)
    return fused(state, x.reshape(n, h * w, c)).reshape(x.shape)
