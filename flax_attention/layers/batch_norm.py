"""BatchNorm with PyTorch's training semantics and a fused backward (NHWC, features last).

Training-mode normalisation is one `jax.custom_vjp` function, `batch_norm_train`. Its forward
computes the batch mean and the biased variance in float32 from one pass over x (`moments`: sums
of x - s and (x - s)^2 with s the first sample's per-channel mean, so no E[x^2] - E[x]^2
cancellation) and keeps only x in its own dtype, the mean and 1/std for the backward.
The backward is the textbook one: one fused reduction of sum(dy) and sum(dy * (x - mean)),
then one elementwise pass `dx = a * dy + b * (x - mean) + c` with per-channel a, b, c.
Across replicas (`axis_name`) each BatchNorm issues one collective in the forward (an
all_gather of every replica's exact (mean, variance), combined with Chan's parallel-variance
formula) and one in the backward (a psum of both sums). Plain
autodiff of the same forward instead keeps `x - mean` in float32 for the backward (twice the
bytes of a bf16 activation, written and read once more per layer).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

Dtype = jnp.dtype | type
F32 = jnp.float32


def global_count(x: jax.Array, axis_name: str | None) -> int | jax.Array:
    """Rows (all but the last axis) of x (..., C), over every replica of `axis_name`."""
    count = x.size // x.shape[-1]
    return count if axis_name is None else count * jax.lax.psum(1, axis_name)


@partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def batch_norm_train(
    x: jax.Array,
    scale: jax.Array,
    bias: jax.Array,
    eps: float,
    axis_name: str | None,
    dtype: Dtype,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Normalise x (..., C) with its batch statistics -> (y in `dtype`, mean (C,), var (C,)).

    `var` is the biased batch variance; statistics are float32 and averaged over `axis_name`'s
    replicas when it is given. Differentiable in x, scale and bias, and through mean and var.
    """
    return _forward(x, scale, bias, eps, axis_name, dtype)[0]


def shifted(x32: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x32 (N, ..., C) minus a per-channel shift, and the shift (C,): the mean of its first
    sample (x32[0] over all but the channel axis, a 1/N share of the data).

    Moments of x - shift are those of x moved by the shift; with the shift near the mean,
    their sums keep float32's precision (the mean's square is not subtracted from a far
    larger mean square, as in E[x^2] - E[x]^2)."""
    first = x32[0].reshape(-1, x32.shape[-1])
    shift = jax.lax.stop_gradient(first.mean(0))
    return x32 - shift, shift


def moments(x32: jax.Array, axes: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    """Mean and biased variance of x32 over `axes`, from one pass (one reduction of the sums
    of x - s and (x - s)^2 with `shifted`'s per-channel s)."""
    d, shift = shifted(x32)
    mean_d, mean_sq = d.mean(axes), jnp.square(d).mean(axes)
    return mean_d + shift, jnp.maximum(mean_sq - jnp.square(mean_d), 0.0)


def batch_statistics(x32: jax.Array, axis_name: str | None) -> tuple[jax.Array, jax.Array]:
    """Mean and biased variance of x32 (..., C) per channel (`moments`, one pass).

    With `axis_name`, the statistics of every replica's x32 together (each replica holds the
    same number of rows) from one all_gather of the replicas' (mean_i, var_i), (R, 2, C):
    mean = mean_i(mean_i), var = mean_i(var_i) + mean_i((mean_i - mean)^2) (Chan et al.'s
    pairwise combination for equal counts; no E[x^2] - E[x]^2 cancellation).
    """
    mean, var = moments(x32, tuple(range(x32.ndim - 1)))
    return combine_replicas(mean, var, axis_name)


def combine_replicas(
    mean: jax.Array, var: jax.Array, axis_name: str | None
) -> tuple[jax.Array, jax.Array]:
    """Every replica's (mean, biased variance), each (C,) over the same number of rows, as
    the statistics of all their rows together (identity when `axis_name` is None)."""
    if axis_name is None:
        return mean, var
    means, variances = jax.lax.all_gather(jnp.stack([mean, var]), axis_name).swapaxes(0, 1)
    mean = means.mean(0)
    return mean, variances.mean(0) + jnp.square(means - mean).mean(0)


def _forward(x, scale, bias, eps, axis_name, dtype):
    x32 = x.astype(F32)
    mean, var = batch_statistics(x32, axis_name)
    rstd = jax.lax.rsqrt(var + eps)
    y = (x32 - mean) * (rstd * scale.astype(F32)) + bias.astype(F32)
    return (y.astype(dtype), mean, var), (x, scale, bias, mean, rstd)


def _backward(eps, axis_name, dtype, residuals, cotangents):
    x, scale, bias, mean, rstd = residuals
    dy, d_mean, d_var = cotangents
    axes = tuple(range(x.ndim - 1))
    xc = x.astype(F32) - mean
    dy32 = dy.astype(F32)
    sum_dy, sum_dy_xc = dy32.sum(axes), (dy32 * xc).sum(axes)
    d_scale, d_bias = sum_dy_xc * rstd, sum_dy
    if axis_name is not None:  # dx needs the statistics of every replica's dy
        sum_dy, sum_dy_xc = jax.lax.psum((sum_dy, sum_dy_xc), axis_name)
    n = global_count(x, axis_name)
    s = scale.astype(F32)
    a = s * rstd
    b = -s * rstd**3 * sum_dy_xc / n + 2.0 * d_var / n
    c = -a * sum_dy / n + d_mean / n
    dx = (a * dy32 + b * xc + c).astype(x.dtype)
    return dx, d_scale.astype(scale.dtype), d_bias.astype(bias.dtype)


batch_norm_train.defvjp(_forward, _backward)


class BatchNorm(nnx.BatchNorm):
    """`nnx.BatchNorm` with PyTorch's training semantics.

    The `momentum` argument is PyTorch's (weight of the new batch, 0.1 by default); the
    `momentum` attribute keeps Flax's meaning, the weight of the old running value, so it holds
    1 - the argument. In training mode the input is normalised with the biased batch variance
    (float32, `moments`), and the running variance is updated with the unbiased one (times
    n/(n-1)), as PyTorch does.
    Statistics are averaged over `axis_name` (pmap/shard_map) when it is given. Features last.
    """

    def __init__(
        self,
        num_features: int,
        *,
        momentum: float = 0.1,
        eps: float = 1e-5,
        axis_name: str | None = None,
        rngs: nnx.Rngs,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
    ):
        super().__init__(
            num_features,
            momentum=1.0 - momentum,
            epsilon=eps,
            axis_name=axis_name,
            use_fast_variance=False,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )

    def __call__(self, x: jax.Array, use_running_average: bool | None = None) -> jax.Array:
        if use_running_average is None:
            use_running_average = self.use_running_average
        dtype = self.dtype or x.dtype
        if not use_running_average:
            return self._normalize_batch(x, dtype)
        rstd = jax.lax.rsqrt(self.var[...] + self.epsilon)
        y = (x.astype(F32) - self.mean[...]) * (rstd * self.scale[...].astype(F32))
        return (y + self.bias[...].astype(F32)).astype(dtype)

    def _normalize_batch(self, x: jax.Array, dtype: Dtype) -> jax.Array:
        """Training mode: normalise with the batch statistics and update the running ones."""
        y, mean, var = batch_norm_train(
            x, self.scale[...], self.bias[...], self.epsilon, self.axis_name, dtype
        )
        self.update_running_statistics(mean, var, global_count(x, self.axis_name))
        return y

    def update_running_statistics(
        self, mean: jax.Array, var: jax.Array, count: int | jax.Array
    ) -> None:
        """Blend one batch's mean and biased variance (C,), over `count` rows, into the running
        statistics (the variance made unbiased, times count/(count-1), as PyTorch does)."""
        unbiased = var * (count / jnp.maximum(count - 1, 1))
        keep = self.momentum  # Flax's meaning: weight of the old value (1 - PyTorch's)
        self.mean[...] = jax.lax.stop_gradient(keep * self.mean[...] + (1 - keep) * mean)
        self.var[...] = jax.lax.stop_gradient(keep * self.var[...] + (1 - keep) * unbiased)
