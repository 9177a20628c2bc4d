"""A training-mode BatchNorm, the channel gate that pools its output (SE, or CBAM's channel
gate, after a residual block's last BatchNorm) and optionally CBAM's spatial gate after it, as
one custom VJP that reads the tensor no more often than it has to and stores nothing of the size
of x but x itself.

NHWC x (N, H, W, C), batch statistics in float32, `a = scale / sqrt(var + eps)`:

    y = (x - mean) * a + bias
    u = y * g,  g = excite(mean_HW(y), max_HW(y)) (N, C)
    out = u * s,  s = spatial_excite(mean_C(u), max_C(u)) (N, H, W, 1)   (out = u without it)

The channel gate's descriptors need no pass of their own: `mean_HW(y) = a * (mean_HW(x) - mean)
+ bias`, and the per-sample means `mean_HW(x)` are the partial sums the batch mean is reduced
from; y is monotone in x, so `max_HW(y)` is y at x's maximum over H*W (its minimum where a < 0),
which the same pass finds. The spatial gate's pools over C take one more read of x (u is
recomputed from it, never stored), and so does its backward's `sum_C(dout * u)`.

The backward reduces `S1 = sum_HW(du)` and `S2 = sum_HW(du * (x - mean))` per sample in one pass
over (dout, x), where du is u's cotangent (`dout * s` plus the spatial pools' terms, or dout); the
channel gate's cotangent is `sum_HW(du * y) = a * S2 + bias * S1`, and y's cotangent
(`du * g + d_mean_HW / (H * W)`, plus `d_max_HW / ties` where x is at its extreme) has
per-channel sums that follow from S1 and S2 too, so one more elementwise pass writes dx. The
values are the composition's; in a compute dtype narrower than float32, y and u are not rounded
before they are pooled and multiplied (so max-pool ties are those of the unrounded values).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from flax_attention.kernels.schedule import custom_vjp
from flax_attention.layers.batch_norm import F32, BatchNorm, combine_replicas, global_count
from flax_attention.layers.common import check_nhwc

FUSED_POOLS = ("avg", "max")


def batch_norm_channel_gate(
    norm: BatchNorm, gate: nnx.Module, x: jax.Array, spatial: nnx.Module | None = None
) -> jax.Array:
    """`spatial(gate(norm(x)))` (or `gate(norm(x))`) with `norm` in training mode, on NHWC x
    (N, H, W, C) -> (N, H, W, C) in norm's dtype (x's when it has none), updating the running
    statistics of norm (and of the spatial gate's BatchNorm) as the composition does.

    `gate` (SE, ChannelGate) pools its input over H*W with `gate.pool_types`, within
    FUSED_POOLS, and `gate.excite({pool: (N, C) float32})` gives the gate (N, C) in float32.
    `spatial` (CBAM's SpatialGate) pools over C with mean and max, and
    `spatial.excite({"avg": (N, H, W), "max": (N, H, W)})` gives its gate (N, H, W, 1) in float32.
    Gradients reach x, norm's scale and bias, and the gates' parameters.
    """
    check_nhwc(x, norm.num_features, "batch_norm_channel_gate")
    pools = tuple(gate.pool_types)
    if not set(pools) <= set(FUSED_POOLS):
        raise ValueError(f"pool_types {list(pools)} are not within {list(FUSED_POOLS)}")
    dtype = norm.dtype or x.dtype
    _, h, w, _ = x.shape
    eps, axis_name = norm.epsilon, norm.axis_name
    gate_graph, gate_state = nnx.split(gate)
    spatial_params, spatial_rest = {}, {}
    if spatial is not None:
        spatial_graph, spatial_params, spatial_rest = nnx.split(spatial, nnx.Param, ...)

    def excite(state, pooled):
        return nnx.merge(gate_graph, state).excite(pooled)

    def spatial_excite(params, rest, pooled):
        module = nnx.merge(spatial_graph, params, rest)
        return module.excite(pooled), nnx.state(module, nnx.Not(nnx.Param))

    def fwd(x, scale, bias, state, spatial_params, spatial_rest):
        x32 = x.astype(F32)
        per_sample = x32.mean((1, 2))  # (N, C), in the pass with the extremes below
        local_mean = per_sample.mean(0)
        local_var = jnp.square(x32 - local_mean).mean((0, 1, 2))
        mean, var = combine_replicas(local_mean, local_var, axis_name)
        rstd = jax.lax.rsqrt(var + eps)
        a, b = scale.astype(F32) * rstd, bias.astype(F32)
        centred = {"avg": per_sample - mean}  # (N, C) per pool: the pooled x, minus mean
        extreme = None
        if "max" in pools:
            # y = (x - mean) * a + b is monotone in x, so its H*W maximum is where x is
            # largest (a >= 0) or smallest: `extreme` (N, C).
            extreme = jnp.where(a >= 0, x32.max((1, 2)), x32.min((1, 2)))
            centred["max"] = extreme - mean
        pooled = {p: centred[p] * a + b for p in pools}
        g, excite_vjp = jax.vjp(excite, state, pooled)
        u = ((x32 - mean) * a + b) * g[:, None, None, :]
        spatial_residuals, rest = None, spatial_rest
        if spatial is not None:
            channel_mean, channel_max, ties, first = _pools_over_channels(u)
            channel_pools = {"avg": channel_mean, "max": channel_max}
            sg, spatial_vjp, rest = jax.vjp(
                spatial_excite, spatial_params, spatial_rest, channel_pools, has_aux=True
            )
            u = u * sg
            spatial_residuals = (sg, channel_max, ties, first, spatial_vjp)
        residuals = (x, scale, bias, mean, rstd, centred, extreme, g, excite_vjp, spatial_residuals)
        return (u.astype(dtype), mean, var, rest), residuals

    def bwd(residuals, cotangents):
        x, scale, bias, mean, rstd, centred, extreme, g, excite_vjp, spatial_residuals = residuals
        d_out, d_mean, d_var, _ = cotangents
        xc = x.astype(F32) - mean
        s = scale.astype(F32)
        a = s * rstd
        du = d_out.astype(F32)
        d_spatial_params = jax.tree.map(jnp.zeros_like, spatial_params)
        if spatial_residuals is not None:
            du, d_spatial_params = _through_spatial_gate(
                du, (xc * a + bias.astype(F32)) * g[:, None, None, :], spatial_residuals
            )
            du = du.astype(x.dtype).astype(F32)  # stored once, in x's dtype, as composed
        s1, s2 = du.sum((1, 2)), (du * xc).sum((1, 2))  # (N, C): one pass over both
        d_state, d_pooled = excite_vjp(a * s2 + bias.astype(F32) * s1)  # d_gate = sum_HW du y
        # y's cotangent is du * g + d_avg / (H * W) (+ d_max / ties where x is `extreme`);
        # its sums over N, H, W, and of it times x - mean, from the per-sample ones:
        sum_dy = (g * s1 + sum(d_pooled.values())).sum(0)
        sum_dy_xc = (g * s2 + sum(d_pooled[p] * centred[p] for p in pools)).sum(0)
        d_scale, d_bias = sum_dy_xc * rstd, sum_dy
        if axis_name is not None:  # dx needs the sums over every replica's rows
            sum_dy, sum_dy_xc = jax.lax.psum((sum_dy, sum_dy_xc), axis_name)
        n = global_count(x, axis_name)
        coef_xc = -s * rstd**3 * sum_dy_xc / n + 2.0 * d_var / n
        d_avg = d_pooled.get("avg", jnp.zeros_like(g))
        shift = -a * sum_dy / n + d_mean / n + a * d_avg / (h * w)  # (N, C)
        dx = (a * g)[:, None, None, :] * du + coef_xc * xc + shift[:, None, None, :]
        if "max" in pools:
            at_max = x.astype(F32) == extreme[:, None, None, :]
            ties = at_max.sum((1, 2), dtype=F32)  # in the pass of s1 and s2
            dx = dx + jnp.where(at_max, (a * d_pooled["max"] / ties)[:, None, None, :], 0.0)
        d_rest = jax.tree.map(jnp.zeros_like, spatial_rest)
        return (
            dx.astype(x.dtype),
            d_scale.astype(scale.dtype),
            d_bias.astype(bias.dtype),
            d_state,
            d_spatial_params,
            d_rest,
        )

    args = (x, norm.scale[...], norm.bias[...], gate_state, spatial_params, spatial_rest)
    out, mean, var, rest = custom_vjp(fwd, bwd)(*args)
    norm.update_running_statistics(mean, var, global_count(x, axis_name))
    if spatial is not None:
        nnx.update(spatial, rest)
    return out


def _pools_over_channels(u: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Over the last axis of float32 u (N, H, W, C), in one variadic reduction: the mean, the
    maximum, how many channels hold it and the first of them, each (N, H, W) float32."""

    def combine(p, q):
        (sp, vp, tp, ip), (sq, vq, tq, iq) = p, q
        peak = jnp.maximum(vp, vq)  # NaN-propagating
        in_p, in_q = vp == peak, vq == peak
        ties = jnp.where(in_p, tp, 0.0) + jnp.where(in_q, tq, 0.0)
        first = jnp.where(in_p & in_q, jnp.minimum(ip, iq), jnp.where(in_p, ip, iq))
        return sp + sq, peak, ties, first

    index = jax.lax.broadcasted_iota(F32, u.shape, u.ndim - 1)
    init = tuple(jnp.array(v, F32) for v in (0.0, -jnp.inf, 0.0, u.shape[-1]))
    total, peak, ties, first = jax.lax.reduce(
        (u, u, jnp.ones_like(u), index), init, combine, (u.ndim - 1,)
    )
    return total / u.shape[-1], peak, ties, first


def _through_spatial_gate(
    d_out: jax.Array, u: jax.Array, residuals: tuple
) -> tuple[jax.Array, object]:
    """u's cotangent (N, H, W, C) float32 and the spatial gate's parameter gradients, from
    `out = u * sg` with sg = spatial_excite(mean_C(u), max_C(u)) (N, H, W, 1).

    The maximum's gradient goes to the one channel holding it (by index: no comparison with a
    recomputed u), or is shared evenly between tied channels, as jnp.max does.
    """
    sg, channel_max, ties, first, spatial_vjp = residuals
    d_sg = (d_out * u).sum(-1, keepdims=True)  # one reduction over C of (dout, x)
    d_params, _, d_pools = spatial_vjp(d_sg)
    index = jax.lax.broadcasted_iota(F32, u.shape, u.ndim - 1)
    unique = (ties == 1)[..., None]
    at_max = jnp.where(unique, index == first[..., None], u == channel_max[..., None])
    d_max = jnp.where(at_max, (d_pools["max"] / ties)[..., None], 0.0)
    du = d_out * sg + (d_pools["avg"] / u.shape[-1])[..., None] + d_max
    return du, d_params
