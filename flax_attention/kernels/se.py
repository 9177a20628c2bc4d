"""Fused channel gate (SE, CBAM's ChannelGate): `y = x * g(pools_HW(x))` with a custom VJP.

Forward: one pass pools x over H*W (sum and max), the module's own `excite` (its MLP) runs in
XLA, one pass applies the gate. Backward: one pass reduces `sum_HW(dy * x)` and counts the max
pool's ties, the VJP of `excite` runs in XLA, one pass writes
`dx = dy * g + d_sum + d_max * [x == max] / ties`. Seven tensor reads and writes against five at
the minimal bytes: the pool is needed before any output can be written, and `sum_HW(dy * x)`
before any dx.
"""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx

from flax_attention.kernels import passes
from flax_attention.kernels.schedule import custom_vjp, pass_runner, round_to


def channel_gate_fused(module: nnx.Module, x: jax.Array, *, executor: Any) -> jax.Array:
    """`x * module.excite(H*W pools of x)` on NHWC x (N, H, W, C) by fused passes -> same shape.

    `module` is an SE or a ChannelGate: `excite({"avg": (N, C), "max": (N, C)})` (float32
    pools) gives its gate (N, C) in float32.
    """
    n, h, w, c = x.shape
    run = pass_runner(executor, x)
    graphdef, state = nnx.split(module)

    def gate_of(state, pooled_sum, pooled_max):
        excite = nnx.merge(graphdef, state).excite
        return excite({"avg": pooled_sum / (h * w), "max": pooled_max})

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

    return custom_vjp(fwd, bwd)(state, x.reshape(n, h * w, c)).reshape(x.shape)
