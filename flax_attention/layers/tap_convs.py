"""Stride-1 convolutions as sums over kernel taps: alternatives to a library convolution.

The gates' spatial convolutions are narrow (CBAM: 7x7, 2 -> 1 channel; BAM: 1x1 C -> C/16,
dilated 3x3 at C/16, 1x1 C/16 -> 1). On a GPU a library convolution of that width is a few
latency-bound kernels forward and more backward (backward-filter, backward-input). The
formulations here compute the same sums from the k*k shifted views of the zero-padded input
(tap (i, j) is `pad(x)[:, i*d : i*d + H, j*d : j*d + W]`, d the dilation), in float32:
- `conv`: the library convolution, `lax.conv_general_dilated` (what nnx.Conv runs);
- `shifts`: `sum_taps tap @ W[i, j]`; with at most UNROLL_CHANNELS input channels every
  product is written out elementwise in float32 (`tap[..., c] * W[i, j, c]`), so that XLA
  fuses the whole convolution, and its gradient with respect to x, into elementwise kernels;
- `im2col`: the taps concatenated on the channel axis, (N, H, W, k*k*C_in), times the kernel
  reshaped to (k*k*C_in, C_out): one matrix product (and two backward).
Products accumulate in float32; only the order of the additions differs between them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.lax import Precision

from flax_attention.layers.common import check_choice

SPATIAL_CONVS = ("conv", "shifts", "im2col")
UNROLL_CHANNELS = 4  # up to this many input channels, `shifts` multiplies elementwise


def taps(x: jax.Array, size: int, dilation: int = 1) -> list[jax.Array]:
    """The size*size shifted views of NHWC x (N, H, W, C), zero-padded by
    dilation*(size-1)//2 on each side, row-major over the kernel: each (N, H, W, C)."""
    pad = dilation * (size - 1) // 2
    _, h, w, _ = x.shape
    xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    return [
        xp[:, i * dilation : i * dilation + h, j * dilation : j * dilation + w]
        for i in range(size)
        for j in range(size)
    ]


def conv_as_shifts(
    x: jax.Array, kernel: jax.Array, dilation: int = 1, precision: Precision | None = None
) -> jax.Array:
    """NHWC x (N, H, W, C_in) conv HWIO kernel (k, k, C_in, C_out), stride 1, symmetric
    padding dilation*(k-1)//2, as a sum over taps -> (N, H, W, C_out) float32. Narrow inputs
    are multiplied elementwise in float32; wider ones by a matrix product per tap in x's dtype,
    accumulated in float32."""
    size, _, cin, _ = kernel.shape
    elementwise = cin <= UNROLL_CHANNELS
    if elementwise:
        x, kernel = x.astype(jnp.float32), kernel.astype(jnp.float32)
    total = 0.0
    for t, tap in enumerate(taps(x, size, dilation)):
        w = kernel[t // size, t % size]  # (C_in, C_out)
        if elementwise:
            total = total + sum(tap[..., c : c + 1] * w[c] for c in range(cin))
        else:
            total = total + jnp.dot(tap, w, preferred_element_type=jnp.float32, precision=precision)
    return total


def conv_as_im2col(
    x: jax.Array, kernel: jax.Array, dilation: int = 1, precision: Precision | None = None
) -> jax.Array:
    """The same convolution as `conv_as_shifts` by one matrix product of the concatenated
    taps (N, H, W, k*k*C_in) in x's dtype, accumulated in float32 -> (N, H, W, C_out)."""
    size, _, cin, cout = kernel.shape
    patches = jnp.concatenate(taps(x, size, dilation), axis=-1)
    return jnp.dot(
        patches,
        kernel.reshape(size * size * cin, cout),
        preferred_element_type=jnp.float32,
        precision=precision,
    )


def apply_conv(conv: nnx.Conv, x: jax.Array, form: str) -> jax.Array:
    """`conv(x)` computed by formulation `form` (one of SPATIAL_CONVS) on NHWC x.

    `conv` must be stride 1, ungrouped, with square kernel and symmetric padding
    dilation*(k-1)//2 (`layers.common.conv2d`'s). Output (N, H, W, C_out) in `conv.dtype`.
    """
    check_choice("spatial_conv", form, SPATIAL_CONVS)
    if form == "conv":
        return conv(x)
    size = conv.kernel[...].shape[0]
    d = conv.kernel_dilation[0]
    pad = d * (size - 1) // 2
    if (
        conv.strides != (1, 1)
        or conv.feature_group_count != 1
        or conv.padding
        != (
            (pad, pad),
            (pad, pad),
        )
    ):
        raise ValueError(f"spatial_conv={form!r} needs a stride-1 ungrouped 'same' conv2d")
    bias = conv.bias[...] if conv.bias is not None else None
    x, kernel, bias = conv.promote_dtype((x, conv.kernel[...], bias), dtype=conv.dtype)
    y = (conv_as_shifts if form == "shifts" else conv_as_im2col)(x, kernel, d, conv.precision)
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y.astype(conv.dtype)
