"""Squeeze-and-Excitation (Hu et al.): channel gate from a global-average descriptor.

References: the Caffe release hujie-frank/SENet (biases on), moskomule/senet.pytorch
(senet/se_module.py: Linear layers without bias) and timm (layers/squeeze_excite.py: 1x1 convs
with bias, hidden width rounded to a multiple of 8).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from flax_attention.layers.common import Dtype, check_nhwc, check_positive, global_mean, linear


def se_hidden_width(channels: int, reduction: int, rd_divisor: int = 1) -> int:
    """Hidden width of the SE bottleneck: `C // r`, or timm's rounding when `rd_divisor > 1`."""
    if rd_divisor == 1:
        return channels // reduction
    rounded = int(channels / reduction + rd_divisor / 2) // rd_divisor * rd_divisor
    return max(rd_divisor, rounded)


class SE(nnx.Module):
    """`y = x * sigmoid(fc2(relu(fc1(mean_HW(x)))))` on NHWC input (N, H, W, C) -> same shape.

    `bias=True` is the Caffe original, `bias=False` senet.pytorch; `rd_divisor=8` gives timm's
    hidden width `max(8, int(C/16 + 4) // 8 * 8)`. Inside a residual block in training mode the
    SE runs fused with the block's last BatchNorm (layers.norm_gate), which makes its pool and
    product free of passes of their own.
    """

    pool_types = ("avg",)  # what `excite` reads

    def __init__(
        self,
        channels: int,
        reduction: int = 16,
        *,
        bias: bool = True,
        rd_divisor: int = 1,
        rngs: nnx.Rngs,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
    ):
        check_positive("channels", channels)
        check_positive("reduction", reduction)
        check_positive("rd_divisor", rd_divisor)
        hidden = se_hidden_width(channels, reduction, rd_divisor)
        check_positive(
            "the hidden width", hidden, f" (channels={channels} // reduction={reduction})"
        )
        self.channels = channels
        self.dtype = dtype
        kw = dict(bias=bias, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.fc1 = linear(channels, hidden, **kw)
        self.fc2 = linear(hidden, channels, **kw)

    def excite(self, pooled: Mapping[str, jax.Array]) -> jax.Array:
        """The excitation (N, C) in float32 from the H*W mean `pooled["avg"]` (N, C) float32.

        The one definition of the gate: the fused path (layers.norm_gate) calls it too.
        """
        s = pooled["avg"].astype(self.dtype)
        return jax.nn.sigmoid(self.fc2(jax.nn.relu(self.fc1(s))).astype(jnp.float32))

    def gate(self, x: jax.Array) -> jax.Array:
        """The excitation (N, C) in float32 for an NHWC input."""
        return self.excite({"avg": global_mean(x)})

    def __call__(self, x: jax.Array) -> jax.Array:
        check_nhwc(x, self.channels, "SE")
        x = x.astype(self.dtype)
        return x * self.gate(x)[:, None, None, :].astype(self.dtype)
