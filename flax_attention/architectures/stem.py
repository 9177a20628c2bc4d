"""The ResNet stem convolution (7x7, stride 2, padding 3, no bias), NHWC, in two formulations.

Its parameter is the ordinary HWIO kernel `(7, 7, in, out)`, so checkpoints and the converter
see a plain convolution. With 3 input channels the direct convolution uses the GPU's matrix
units poorly; `space_to_depth` computes exactly the same sums as a 4x4 stride-1 convolution over
the input regrouped into 2x2 blocks (12 channels), the kernel zero-padded to 8x8 and regrouped
the same way (MLPerf's ResNet stem trick). Only the order of the float32 additions differs.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from flax_attention.layers.common import Dtype, conv_init, conv_nhwc
from flax_attention.layers.policy import Rule, resolve


def _blocks(a: jax.Array, first: int) -> jax.Array:
    """Regroup axes (first, first+1) of size (2B, 2D) into 2x2 blocks: (..., B, D, 4 * rest)."""
    shape = a.shape
    b, d = shape[first] // 2, shape[first + 1] // 2
    a = a.reshape(*shape[:first], b, 2, d, 2, *shape[first + 2 :])
    a = jnp.moveaxis(a, first + 2, first + 1)  # (..., B, D, 2, 2, rest...)
    return a


def space_to_depth(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
    """The stride-2 convolution as a stride-1 one on 2x2 blocks; same result as `conv_nhwc`."""
    if stride != 2:
        return conv_nhwc(x, kernel, stride)
    n, h, w, c = x.shape
    k, _, _, o = kernel.shape
    pad, taps = k // 2, (k + 1) // 2  # taps: kernel blocks per axis
    h_out, w_out = (h + 2 * pad - k) // 2 + 1, (w + 2 * pad - k) // 2 + 1
    rows, cols = 2 * (h_out + taps - 1), 2 * (w_out + taps - 1)
    x = jnp.pad(x, ((0, 0), (pad, rows - h - pad), (pad, cols - w - pad), (0, 0)))
    x = _blocks(x, 1).reshape(n, rows // 2, cols // 2, 4 * c)
    kernel = jnp.pad(kernel, ((0, 2 * taps - k), (0, 2 * taps - k), (0, 0), (0, 0)))
    kernel = _blocks(kernel, 0).reshape(taps, taps, 4 * c, o)
    return jax.lax.conv_general_dilated(
        x, kernel, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


FORMULATIONS: dict[str, Callable[[jax.Array, jax.Array, int], jax.Array]] = {
    "direct": conv_nhwc,
    "space_to_depth": space_to_depth,
}


class StemConv(nnx.Module):
    """k x k convolution, stride `stride`, padding k // 2, no bias: (N, H, W, in) -> NHWC out.

    `kernel` is HWIO `(k, k, in, out)`; `formulation` names an entry of `FORMULATIONS` (all
    give the same result), or is "auto": this device's measured choice (layers.policy, op
    "stem"; "direct" where unmeasured).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 7,
        stride: int = 2,
        *,
        rngs: nnx.Rngs,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        formulation: str | Rule = "auto",
    ):
        formulation = resolve("stem", formulation)
        shape = (kernel_size, kernel_size, in_channels, out_channels)
        self.kernel = nnx.Param(conv_init(rngs.params(), shape, param_dtype))
        self.stride, self.dtype, self.formulation = stride, dtype, formulation

    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.kernel[...].astype(self.dtype)
        return FORMULATIONS[self.formulation](x.astype(self.dtype), kernel, self.stride)
