"""PyTorch-semantics building blocks shared by the attention modules (NHWC throughout)."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from flax_attention.initializers import he_normal_fan_out, lecun_normal

Dtype = jnp.dtype | type

# torchvision/timm initialise convolutions with He-normal over fan-out; sampled on the host
# (flax_attention.initializers: no XLA compilation per parameter shape).
conv_init = he_normal_fan_out


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


class PointwiseConv(nnx.Conv):
    """A 1x1 convolution (no bias, no groups) computed as a matrix product over the channels.

    NHWC `(N, H, W, in)` -> `(N, ceil(H / stride), ceil(W / stride), out)`; the kernel stays HWIO
    `(1, 1, in, out)`, so parameters, checkpoints and the converter see an `nnx.Conv`. As a
    contraction (a strided one takes every `stride`-th pixel first), XLA can fuse the input's
    elementwise producers (the previous BatchNorm's scale, shift and ReLU) into the matrix
    product instead of writing them out for a convolution.
    """

    def __call__(self, inputs: jax.Array) -> jax.Array:
        stride = self.strides[0] if isinstance(self.strides, Sequence) else self.strides
        dtype = self.dtype or jnp.result_type(inputs, self.kernel[...])
        x = inputs.astype(dtype)
        if stride != 1:
            x = x[:, ::stride, ::stride]
        return jnp.einsum("nhwc,co->nhwo", x, self.kernel[...][0, 0].astype(dtype))


def pointwise_conv(
    in_channels: int,
    out_channels: int,
    *,
    stride: int = 1,
    rngs: nnx.Rngs,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
) -> PointwiseConv:
    """`conv2d(in_channels, out_channels, 1, stride=stride)` as a `PointwiseConv`."""
    return PointwiseConv(
        in_channels,
        out_channels,
        kernel_size=(1, 1),
        strides=(stride, stride),
        padding=((0, 0), (0, 0)),
        use_bias=False,
        kernel_init=conv_init,
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
    )


def conv_nhwc(x: jax.Array, kernel: jax.Array, stride: int = 1, groups: int = 1) -> jax.Array:
    """`lax.conv` with PyTorch's symmetric padding k // 2: NHWC x (N, H, W, C), HWIO kernel
    (k, k, C / groups, O) -> (N, H', W', O)."""
    pad = kernel.shape[0] // 2
    return jax.lax.conv_general_dilated(
        x,
        kernel,
        (stride, stride),
        ((pad, pad), (pad, pad)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=groups,
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
    """A dense layer; kernel `(in, out)` (PyTorch's Linear weight transposed), LeCun normal."""
    return nnx.Linear(
        in_features,
        out_features,
        use_bias=bias,
        kernel_init=lecun_normal,
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
    )


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
