"""A training-mode BatchNorm and the channel gate that pools its output (SE, or CBAM's channel
gate, after a residual block's last BatchNorm) as one custom VJP, reading the tensor no more
often than the BatchNorm alone.

NHWC x (N, H, W, C), batch statistics in float32, `a = scale / sqrt(var + eps)`:

    y = (x - mean) * a + bias
    out = y * g,  g = excite(mean_HW(y), max_HW(y)) (N, C)

The gate's descriptors need no pass of their own: `mean_HW(y) = a * (mean_HW(x) - mean) + bias`,
and the per-sample means `mean_HW(x)` are the partial sums the batch mean is reduced from; y is
monotone in x, so `max_HW(y)` is y at x's maximum over H*W (its minimum where a < 0), which the
same pass finds. So the forward reads x once for the statistics and once for `out` (BatchNorm
then SE reads it the same two times, then writes y, reads it to pool and again to multiply).
The backward reduces `S1 = sum_HW(dout)` and `S2 = sum_HW(dout * (x - mean))` per sample in one
pass over (dout, x); the gate's cotangent is `sum_HW(dout * y) = a * S2 + bias * S1`, and y's
cotangent (`dout * g + d_mean_HW / (H * W)`, plus `d_max_HW / ties` where x is at its extreme)
has per-channel sums that follow from S1 and S2 too, so one more elementwise pass writes dx
(BatchNorm then SE: a pass for the gate's cotangent, then BatchNorm's own two). The values are
the composition's (the statistics from one pass over x, as `BatchNorm`'s); in a compute dtype
narrower than float32, y is not rounded before it is pooled and multiplied (so max-pool ties
are those of x, not of the rounded y).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from flax_attention.layers.batch_norm import (
    F32,
    BatchNorm,
    combine_replicas,
    global_count,
    shifted,
)
from flax_attention.layers.common import check_nhwc

FUSED_POOLS = ("avg", "max")


def per_sample_moments(x32: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """NHWC x32 -> (its mean over H*W per sample (N, C), and its mean and biased variance
    over N, H, W (C,)), from one pass: per-sample sums of x - s and (x - s)^2 (`shifted`),
    the same shape as the pass's extremes so that one reduction computes them all."""
    d, shift = shifted(x32)
    mean_d, mean_sq = d.mean((1, 2)), jnp.square(d).mean((1, 2))  # (N, C)
    local_d = mean_d.mean(0)
    local_var = jnp.maximum(mean_sq.mean(0) - jnp.square(local_d), 0.0)
    return mean_d + shift, local_d + shift, local_var


def batch_norm_channel_gate(norm: BatchNorm, gate: nnx.Module, x: jax.Array) -> jax.Array:
    """`gate(norm(x))` with `norm` in training mode, on NHWC x (N, H, W, C) -> (N, H, W, C) in
    norm's dtype (x's when it has none), updating norm's running statistics as `norm(x)` does.

    `gate` (SE, ChannelGate) pools its input over H*W with `gate.pool_types`, within
    FUSED_POOLS, and `gate.excite({pool: (N, C) float32})` gives the gate (N, C) in float32.
    Gradients reach x, norm's scale and bias, and gate's state.
    """
    check_nhwc(x, norm.num_features, "batch_norm_channel_gate")
    pools = tuple(gate.pool_types)
    if not set(pools) <= set(FUSED_POOLS):
        raise ValueError(f"pool_types {list(pools)} are not within {list(FUSED_POOLS)}")
    dtype = norm.dtype or x.dtype
    _, h, w, _ = x.shape
    eps, axis_name = norm.epsilon, norm.axis_name
    graphdef, state = nnx.split(gate)

    def excite(state, pooled):
        return nnx.merge(graphdef, state).excite(pooled)

    def fwd(x, scale, bias, state):
        x32 = x.astype(F32)
        per_sample, local_mean, local_var = per_sample_moments(x32)
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
        out = ((x32 - mean) * a + b) * g[:, None, None, :]
        residuals = (x, scale, bias, mean, rstd, centred, extreme, g, excite_vjp)
        return (out.astype(dtype), mean, var), residuals

    def bwd(residuals, cotangents):
        x, scale, bias, mean, rstd, centred, extreme, g, excite_vjp = residuals
        d_out, d_mean, d_var = cotangents
        xc = x.astype(F32) - mean
        d_out = d_out.astype(F32)
        s1, s2 = d_out.sum((1, 2)), (d_out * xc).sum((1, 2))  # (N, C): one pass over both
        s = scale.astype(F32)
        a = s * rstd
        d_state, d_pooled = excite_vjp(a * s2 + bias.astype(F32) * s1)  # d_gate = sum_HW d_out y
        # y's cotangent is d_out * g + d_avg / (H * W) (+ d_max / ties where x is `extreme`);
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
        dx = (a * g)[:, None, None, :] * d_out + coef_xc * xc + shift[:, None, None, :]
        if "max" in pools:
            at_max = x.astype(F32) == extreme[:, None, None, :]
            ties = at_max.sum((1, 2), dtype=F32)  # in the pass of s1 and s2
            dx = dx + jnp.where(at_max, (a * d_pooled["max"] / ties)[:, None, None, :], 0.0)
        return dx.astype(x.dtype), d_scale.astype(scale.dtype), d_bias.astype(bias.dtype), d_state

    @jax.custom_vjp
    def fused(x, scale, bias, state):
        return fwd(x, scale, bias, state)[0]

    fused.defvjp(fwd, bwd)
    out, mean, var = fused(x, norm.scale[...], norm.bias[...], state)
    norm.update_running_statistics(mean, var, global_count(x, axis_name))
    return out
