"""Fused CBAM: channel gate then spatial gate, `y = round(x * cg) * sg`, Pallas + custom VJP.

Forward, 4 passes over the tensor: H*W sum and max (`channel_pool`); the channel MLP in XLA;
per-pixel max and mean over C of `x * cg` (`spatial_pool`); the 7x7 conv, BatchNorm and sigmoid
on the (N, H, W, 2) descriptor in XLA; one pass writes y (`apply_gates`). `x * cg` is never
stored. Backward, 6 passes: the gates' cotangents and the max pool's ties (`gate_grads`, reads
x and dy); the spatial gate's VJP in XLA; the descriptor's cotangent into cg
(`descriptor_grads`, reads x); the MLP's VJP in XLA; dx (`input_grad`, reads x and dy).
Ten passes against the five of the minimal bytes (the conv needs every pixel's descriptor, and
the MLP every pixel's pool, before the next pass can start).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from flax_attention.kernels.tiles import (
    Tiling,
    apply_gates,
    channel_pool,
    descriptor_grads,
    gate_grads,
    input_grad,
    spatial_pool,
)

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


def cbam_pallas(module: nnx.Module, x: jax.Array, *, impl: str, interpret=None) -> jax.Array:
    """`module` (a CBAM with a spatial gate, avg/max pools) on NHWC x by fused kernels.

    In training mode the spatial BatchNorm's running statistics are updated as the XLA path does.
    """
    n, h, w, c = x.shape
    t = Tiling(n, h * w, c, x.dtype, interpret)
    graphdef, state = nnx.split(module)

    def channel(state, pooled_sum, pooled_max):
        m = nnx.merge(graphdef, state)
        return cbam_excite(m.channel_gate, pooled_sum, pooled_max, h * w)

    def spatial(state, pix_max, pix_mean):
        m = nnx.merge(graphdef, state)
        sg = spatial_excite(m.spatial_gate, pix_max.reshape(n, h, w), pix_mean.reshape(n, h, w))
        return sg.reshape(n, h * w), nnx.state(m, nnx.BatchStat)

    @jax.custom_vjp
    def fused(state, x3):
        return fwd(state, x3)[0]

    def fwd(state, x3):
        pooled_sum, pooled_max = channel_pool(t, impl, x3)
        cg, channel_vjp = jax.vjp(channel, state, pooled_sum, pooled_max)
        pix_max, pix_mean = spatial_pool(t, impl, x3, cg)
        sg, spatial_vjp, stats = jax.vjp(spatial, state, pix_max, pix_mean, has_aux=True)
        y = apply_gates(t, impl, x3, cg, sg)
        return (y, stats), (x3, cg, sg, pooled_max, pix_max, channel_vjp, spatial_vjp)

    def bwd(res, cotangents):
        x3, cg, sg, pooled_max, pix_max, channel_vjp, spatial_vjp = res
        dy = cotangents[0]
        d_cg, d_sg, count = gate_grads(t, impl, x3, dy, cg, sg, chan_max=pooled_max)
        d_state_s, d_pix_max, d_pix_mean = spatial_vjp(d_sg)
        d_cg = d_cg + descriptor_grads(t, impl, x3, cg, pix_max, d_pix_max, d_pix_mean)
        d_state_c, d_sum, d_max = channel_vjp(d_cg)
        spatial_parts = (sg, pix_max, d_pix_max, d_pix_mean)
        max_pool = (pooled_max, d_max / count)
        dx = input_grad(t, impl, x3, dy, cg, d_sum, spatial=spatial_parts, max_pool=max_pool)
        return jax.tree.map(jnp.add, d_state_s, d_state_c), dx

    fused.defvjp(fwd, bwd)
    y, stats = fused(state, x.reshape(n, h * w, c))
    if not module.spatial_gate.bn.use_running_average:  # training: new running statistics
        nnx.update(module, stats)
    return y.reshape(x.shape)
