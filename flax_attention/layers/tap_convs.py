"""Stride-1 convolutions as sums over kernel taps: alternatives to a library convolution.

The gates' spatial convolutions are narrow (CBAM: 7x7, 2 -> 1 channel; BAM: 1x1 C -> C/16,
dilated 3x3 at C/16, 1x1 C/16 -> 1). On a GPU a library convolution of that width is a few
latency-bound kernels forward and more backward (backward-filter, backward-input). The
formulations here compute the same sums from the k*k shifted views of the zero-padded input
(tap (i, j) is `pad(x)[:, i*d : i*d + H, j*d : j*d + W]`, d the dilation), in float32:
- `conv`: the library convolution, `lax.conv_general_dilated` (what nnx.Conv runs);
- `shifts`: `sum_taps tap @ W[i, j]`; with at most UNROLL_CHANNELS channels in and out every
  product is written out elementwise in float32 (`tap[..., c] * W[i, j, c]`), so that XLA
  fuses the convolution, and its gradient with respect to x, into elementwise kernels, and the
  kernel's gradient is one reduction over the taps gathered on a major axis (`narrow_conv`'s
  VJP);
- `im2col`: the taps concatenated on the channel axis, (N, H, W, k*k*C_in), times the kernel
  reshaped to (k*k*C_in, C_out): one matrix product (and two backward);
Products accumulate in float32; only the order of the additions differs between them.
Which one a gate runs is its `formulation` (layers.policy: "auto" is this device's measured
choice at the gate's H*W).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax
from jax.lax import Precision

from flax_attention.layers import policy
from flax_attention.layers.common import check_choice

FORMULATIONS = policy.FORMULATIONS["cbam"]  # the same for BAM
UNROLL_CHANNELS = 4  # up to this many channels in and out, `shifts` multiplies elementwise


def _pad_same(x: jax.Array, size: int, dilation: int = 1) -> jax.Array:
    """NHWC x (N, H, W, C) zero-padded by dilation*(size-1)//2 on each side of H and W."""
    pad = dilation * (size - 1) // 2
    return jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))


def taps(x: jax.Array, size: int, dilation: int = 1) -> list[jax.Array]:
    """The size*size shifted views of NHWC x (N, H, W, C), zero-padded by
    dilation*(size-1)//2 on each side, row-major over the kernel: each (N, H, W, C)."""
    _, h, w, _ = x.shape
    xp = _pad_same(x, size, dilation)
    return [
        xp[:, i * dilation : i * dilation + h, j * dilation : j * dilation + w]
        for i in range(size)
        for j in range(size)
    ]


def _narrow_sum(x: jax.Array, kernel: jax.Array, dilation: int) -> jax.Array:
    """sum over taps and input channels of `tap[..., c:c+1] * W[i, j, c]`, all elementwise."""
    size, _, cin, _ = kernel.shape
    total = 0.0
    for t, tap in enumerate(taps(x, size, dilation)):
        w = kernel[t // size, t % size]  # (C_in, C_out)
        total = total + sum(tap[..., c : c + 1] * w[c] for c in range(cin))
    return total


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def narrow_conv(x: jax.Array, kernel: jax.Array, dilation: int) -> jax.Array:
    """The conv of `conv_as_shifts` for at most UNROLL_CHANNELS input and output channels,
    elementwise in x's dtype (float32 here). Its VJP: dx is the same formulation with the
    kernel flipped in space and transposed (C_in <-> C_out); dkernel is one reduction over
    N, H, W of the taps times dy (`_narrow_kernel_grad`; autodiff would write one reduction
    per tap and channel)."""
    return _narrow_sum(x, kernel, dilation)


def _narrow_fwd(x, kernel, dilation):
    return _narrow_sum(x, kernel, dilation), (x, kernel)


def _narrow_bwd(dilation, residuals, dy):
    x, kernel = residuals
    dx = _narrow_sum(dy, jnp.flip(kernel, (0, 1)).swapaxes(2, 3), dilation)
    return dx, _narrow_kernel_grad(x, dy, kernel.shape, dilation)


def _narrow_kernel_grad(
    x: jax.Array, dy: jax.Array, shape: tuple[int, ...], dilation: int
) -> jax.Array:
    """HWIO kernel gradient of a narrow stride-1 conv of x (N, H, W, C_in) with output
    cotangent dy (N, H, W, C_out), in float32: `sum_{n,h,w} tap[n,h,w,c] * dy[n,h,w,o]` for
    every tap, as one reduction over the minor axes of (k*k, C_in, C_out, N, H, W).

    The taps are gathered on a major axis by index arithmetic (a vmapped dynamic slice of the
    padded input laid out (C_in, N, H', W')), which XLA fuses into the reduction. Stacked on a
    minor axis instead they cost 1.56 ms at CBAM's 56x56 (batch 256, H200: every element picks
    its tap through a k*k-way concatenate), and cuDNN's kernel gradient 0.24 ms; this, 0.07 ms.
    """
    size, _, cin, cout = shape
    n, h, w, _ = x.shape
    padded = _pad_same(x.astype(jnp.float32), size, dilation)
    padded = padded.transpose(3, 0, 1, 2)  # (C_in, N, H + 2 pad, W + 2 pad)
    rows, cols = jnp.divmod(jnp.arange(size * size), size)
    gathered = jax.vmap(
        lambda i, j: lax.dynamic_slice(padded, (0, 0, i * dilation, j * dilation), (cin, n, h, w))
    )(rows, cols)  # (k*k, C_in, N, H, W)
    dy = dy.astype(jnp.float32).transpose(3, 0, 1, 2)  # (C_out, N, H, W)
    dk = jnp.sum(gathered[:, :, None] * dy[None, None], axis=(3, 4, 5))  # (k*k, C_in, C_out)
    return dk.reshape(size, size, cin, cout)


narrow_conv.defvjp(_narrow_fwd, _narrow_bwd)


def conv_as_shifts(
    x: jax.Array, kernel: jax.Array, dilation: int = 1, precision: Precision | None = None
) -> jax.Array:
    """NHWC x (N, H, W, C_in) conv HWIO kernel (k, k, C_in, C_out), stride 1, symmetric
    padding dilation*(k-1)//2, as a sum over taps -> (N, H, W, C_out) float32. Narrow convs
    (at most UNROLL_CHANNELS channels in and out) are elementwise in float32 (`narrow_conv`);
    wider ones a matrix product per tap in x's dtype, accumulated in float32."""
    size, _, cin, cout = kernel.shape
    if max(cin, cout) <= UNROLL_CHANNELS:
        return narrow_conv(x.astype(jnp.float32), kernel.astype(jnp.float32), dilation)
    total = 0.0
    for t, tap in enumerate(taps(x, size, dilation)):
        w = kernel[t // size, t % size]  # (C_in, C_out)
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


FORMS: dict[str, Callable[..., jax.Array]] = {
    "shifts": conv_as_shifts,
    "im2col": conv_as_im2col,
}


def apply_conv(conv: nnx.Conv, x: jax.Array, form: str) -> jax.Array:
    """`conv(x)` computed by formulation `form` (one of FORMULATIONS) on NHWC x.

    `conv` must be stride 1, ungrouped, with square kernel and symmetric padding
    dilation*(k-1)//2 (`layers.common.conv2d`'s). Output (N, H, W, C_out) in `conv.dtype`.
    """
    check_choice("formulation", form, FORMULATIONS)
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
        raise ValueError(f"formulation={form!r} needs a stride-1 ungrouped 'same' conv2d")
    bias = conv.bias[...] if conv.bias is not None else None
    x, kernel, bias = conv.promote_dtype((x, conv.kernel[...], bias), dtype=conv.dtype)
    y = FORMS[form](x, kernel, d, conv.precision)
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y.astype(conv.dtype)
