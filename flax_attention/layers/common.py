"""PyTorch-semantics building blocks shared by the attention modules (NHWC throughout)."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

Dtype = jnp.dtype | type

# torchvision/timm initialise convolutions with He-normal over fan-out.
conv_init = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")


def conv2d(
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    *,
    stride: int = 1,
    dilation: int = 1,
    groups: int = 1,
    bias: bool = False,
    rngs: nnx.Rngs,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
) -> nnx.Conv:
    """A square NHWC convolution padded like PyTorch's `padding=dilation*(k-1)//2`.

    The padding is explicit and symmetric: XLA's 'SAME' pads asymmetrically at stride 2 on even
    sizes and breaks parity with ported weights. Kernel layout HWIO `(k, k, in/groups, out)`.
    """
    pad = dilation * (kernel_size - 1) // 2
    return nnx.Conv(
        in_channels,
        out_channels,
        kernel_size=(kernel_size, kernel_size),
        strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        kernel_dilation=(dilation, dilation),
        feature_group_count=groups,
        use_bias=bias,
        kernel_init=conv_init,
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
    )


def linear(
    in_features: int,
    out_features: int,
    *,
    bias: bool = True,
    rngs: nnx.Rngs,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
) -> nnx.Linear:
    """A dense layer; kernel `(in, out)` (PyTorch's Linear weight transposed)."""
    return nnx.Linear(
        in_features,
        out_features,
        use_bias=bias,
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
    )


class BatchNorm(nnx.BatchNorm):
    """`nnx.BatchNorm` with PyTorch's training semantics.

    `momentum` is PyTorch's (weight of the new batch, 0.1 by default). In training mode the input
    is normalised with the biased batch variance, computed as mean((x - mean)^2) in float32, and
    the running variance is updated with the unbiased one (times n/(n-1)), as PyTorch does.
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
        axes = tuple(range(x.ndim - 1))
        x32 = x.astype(jnp.float32)
        if use_running_average:
            mean, var = self.mean[...], self.var[...]
        else:
            mean, var = self._batch_stats(x32, axes)
            count = x.size // x.shape[-1]
            if self.axis_name is not None:
                count *= jax.lax.psum(1, self.axis_name)
            unbiased = var * (count / jnp.maximum(count - 1, 1))
            keep = self.momentum  # Flax convention: weight of the old value
            self.mean[...] = jax.lax.stop_gradient(keep * self.mean[...] + (1 - keep) * mean)
            self.var[...] = jax.lax.stop_gradient(keep * self.var[...] + (1 - keep) * unbiased)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.epsilon)
        y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(self.dtype or x.dtype)

    def _batch_stats(self, x32: jax.Array, axes: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
        mean = x32.mean(axes)
        if self.axis_name is not None:
            mean = jax.lax.pmean(mean, self.axis_name)
        var = jnp.square(x32 - mean).mean(axes)
        if self.axis_name is not None:
            var = jax.lax.pmean(var, self.axis_name)
        return mean, var


def check_nhwc(x: jax.Array, channels: int, module: str) -> None:
    """Raise a ValueError unless `x` is a rank-4 NHWC array with `channels` channels."""
    shape = tuple(x.shape)
    if len(shape) != 4:
        raise ValueError(
            f"{module} expects a rank-4 NHWC input (N, H, W, C={channels}); got shape {shape}"
        )
    if shape[-1] != channels:
        hint = ""
        if shape[1] == channels:
            hint = (
                " The input looks like NCHW; flax_attention takes NHWC:"
                " use x.transpose(0, 2, 3, 1)."
            )
        raise ValueError(
            f"{module} was built for {channels} channels but the input has {shape[-1]} in its"
            f" last axis (shape {shape}, NHWC expected).{hint}"
        )


def check_choice(name: str, value: object, choices: Sequence[object]) -> None:
    """Raise a ValueError naming the argument when `value` is not one of `choices`."""
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not supported; choose one of {list(choices)}")


def check_positive(name: str, value: int, detail: str = "") -> None:
    """Raise a ValueError naming the argument when `value` < 1."""
    if value < 1:
        raise ValueError(f"{name} must be at least 1, got {value}{detail}")


def global_mean(x: jax.Array) -> jax.Array:
    """Mean over H and W of an NHWC array, accumulated in float32: (N, H, W, C) -> (N, C)."""
    return jnp.mean(x, axis=(1, 2), dtype=jnp.float32)
