"""Fused CBAM: channel gate then spatial gate, `y = round(x * cg) * sg`, with a custom VJP.

Forward, 4 tensor passes: H*W sum and max (`CHANNEL_POOL`); the channel MLP in XLA
(`ChannelGate.excite`); per-pixel max and sum over C of `x * cg` (`SPATIAL_POOL`); the 7x7 conv,
BatchNorm and sigmoid on the (N, H, W, 2) descriptor in XLA (`SpatialGate.excite`); one pass
writes y (`APPLY_BOTH_GATES`). `x * cg` is never stored. Backward, 6 passes: the gates' cotangents and the ties of both max pools
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
from flax_attention.kernels.schedule import custom_vjp, pass_runner, round_to

SUPPORTED_POOLS = ("avg", "max")


def cbam_fused(module: nnx.Module, x: jax.Array, *, executor: Any) -> jax.Array:
    """`module` (a CBAM with a spatial gate, avg/max pools) on NHWC x by fused passes.

    In training mode the spatial BatchNorm's running statistics are updated as the XLA path does.
    """
    n, h, w, c = x.shape
    run = pass_runner(executor, x)
    graphdef, state = nnx.split(module)

    def channel(state, pooled_sum, pooled_max):
        excite = nnx.merge(graphdef, state).channel_gate.excite
        return excite({"avg": pooled_sum / (h * w), "max": pooled_max})

    def spatial(state, pix_max, pix_sum):
        m = nnx.merge(graphdef, state)
        pooled = {"max": pix_max.reshape(n, h, w), "avg": (pix_sum / c).reshape(n, h, w)}
        sg = m.spatial_gate.excite(pooled)
        return sg.reshape(n, h * w), nnx.state(m, nnx.BatchStat)

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

    y, stats = custom_vjp(fwd, bwd)(state, x.reshape(n, h * w, c))
    if not module.spatial_gate.bn.use_running_average:  # training: new running statistics
        nnx.update(module, stats)
    return y.reshape(x.shape)
