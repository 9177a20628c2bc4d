"""Fused CBAM: channel gate then spatial gate, `y = round(x * cg) * sg`, with a custom VJP.

Forward, 4 tensor passes: H*W sum and max (`CHANNEL_POOL`); the channel MLP in XLA; per-pixel
max and sum over C of `x * cg` (`SPATIAL_POOL`); the 7x7 conv, BatchNorm and sigmoid on the
(N, H, W, 2) descriptor in XLA; one pass writes y (`APPLY_BOTH_GATES`). `x * cg` is never
stored. Backward, 6 passes: the gates' cotangents and the ties of both max pools
(`BOTH_GATES_GRADS`, reads x and dy); the spatial gate's VJP in XLA; the descriptor's cotangent
into cg (`DESCRIPTOR_GRADS`, reads x); the MLP's VJP in XLA; dx (`BOTH_GATES_INPUT_GRAD`, reads
x and dy, writes dx). Ten passes against the five of the minimal bytes: the conv needs every
pixel's descriptor, and the MLP every pixel's pool, before the next pass can start.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from flax_attention.kernels import passes
from flax_attention.kernels.executors import Problem
from flax_attention.kernels.se import round_to

SUPPORTED_POOLS = ("avg", "max")


def cbam_excite(gate: nnx.Module, pooled_sum: jax.Array, pooled_max: jax.Array, hw: int):
    """`ChannelGate.gate` from the H*W sum and max: sigmoid(sum_p mlp(pool_p))."""
    pools = {"avg": pooled_sum / hw, "max": pooled_max}
    total = 0.0
    for pool in gate.pool_types:
        s = pools[pool].astype(gate.dtype)
        total = total + gate.fc2(jax.nn.relu(gate.fc1(s))).astype(jnp.float32)
    return jax.nn.sigmoid(total)


def spatial_excite(gate: nnx.Module, pix_max: jax.Array, pix_mean: jax.Array) -> jax.Array:
    """`SpatialGate.gate` from the per-pixel descriptor (N, H, W) each -> (N, H, W) float32."""
    pools = {"max": pix_max, "mean": pix_mean}
    s = jnp.stack([pools[p] for p in gate.descriptor], axis=-1).astype(gate.dtype)
    return jax.nn.sigmoid(gate.bn(gate.conv(s)).astype(jnp.float32))[..., 0]


def cbam_fused(module: nnx.Module, x: jax.Array, *, executor: Any) -> jax.Array:
    """`module` (a CBAM with a spatial gate, avg/max pools) on NHWC x by fused passes.

    In training mode the spatial BatchNorm's running statistics are updated as the XLA path does.
    """
    n, h, w, c = x.shape
    problem = Problem(n, h * w, c, x.dtype)
    graphdef, state = nnx.split(module)

    def run(p, **inputs):
        return executor(p, problem, **inputs)

    def channel(state, pooled_sum, pooled_max):
        m = nnx.merge(graphdef, state)
        return cbam_excite(m.channel_gate, pooled_sum, pooled_max, h * w)

    def spatial(state, pix_max, pix_sum):
        m = nnx.merge(graphdef, state)
        pix_mean = (pix_sum / c).reshape(n, h, w)
        sg = spatial_excite(m.spatial_gate, pix_max.reshape(n, h, w), pix_mean)
        return sg.reshape(n, h * w), nnx.state(m, nnx.BatchStat)

    @jax.custom_vjp
    def fused(state, x3):
        return fwd(state, x3)[0]

    def fwd(state, x3):
        pools = run(passes.CHANNEL_POOL, x=x3)
        cg, channel_vjp = jax.vjp(channel, state, pools["sum"], pools["max"])
        cg = round_to(cg, x3.dtype)  # gates multiply in the compute dtype, as in the XLA path
        desc = run(passes.SPATIAL_POOL, x=x3, cg=cg)
        sg, spatial_vjp, stats = jax.vjp(spatial, state, desc["max"], desc["sum"], has_aux=True)
        sg = round_to(sg, x3.dtype)
        y = run(passes.APPLY_BOTH_GATES, x=x3, cg=cg, sg=sg)["y"]
        res = (x3, cg, sg, pools["max"], desc["max"], channel_vjp, spatial_vjp)
        return (y, stats), res

    def bwd(res, cotangents):
        x3, cg, sg, chan_max, pix_max, channel_vjp, spatial_vjp = res
        dy = cotangents[0]
        grads = run(
            passes.BOTH_GATES_GRADS, x=x3, dy=dy, cg=cg, chan_max=chan_max, sg=sg, pix_max=pix_max
        )
        d_state_s, d_pix_max, d_pix_sum = spatial_vjp(grads["d_sg"])
        descriptor = {
            "pix_max": pix_max,
            "d_pix_max": d_pix_max / grads["pix_ties"],
            "d_pix_sum": d_pix_sum,
        }
        d_cg = grads["d_cg"] + run(passes.DESCRIPTOR_GRADS, x=x3, cg=cg, **descriptor)["d_cg"]
        d_state_c, d_sum, d_max = channel_vjp(d_cg)
        pool_grads = {"d_sum": d_sum, "chan_max": chan_max, "d_chan_max": d_max / grads["ties"]}
        dx = run(
            passes.BOTH_GATES_INPUT_GRAD, x=x3, dy=dy, cg=cg, sg=sg, **pool_grads, **descriptor
        )["dx"]
        return jax.tree.map(jnp.add, d_state_s, d_state_c), dx

    fused.defvjp(fwd, bwd)
    y, stats = fused(state, x.reshape(n, h * w, c))
    if not module.spatial_gate.bn.use_running_average:  # training: new running statistics
        nnx.update(module, stats)
    return y.reshape(x.shape)
