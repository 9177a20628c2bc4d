"""BAM (Park et al.): `x * (1 + sigmoid(channel(x) (*) spatial(x)))`, NHWC.

Reference: Jongchan/attention-module MODELS/bam.py. The authors' code multiplies the two
branches inside the sigmoid (`combine="product"`); the paper adds them (`combine="sum"`).
Their channel pool is an HxH window (global only on square inputs); ours is the global mean.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from flax_attention.layers.batch_norm import BatchNorm
from flax_attention.layers.common import (
    Dtype,
    check_choice,
    check_nhwc,
    check_positive,
    conv2d,
    global_mean,
    linear,
)
from flax_attention.layers.policy import Rule, check_formulation, resolve
from flax_attention.layers.tap_convs import apply_conv

COMBINES: dict[str, Callable[[jax.Array, jax.Array], jax.Array]] = {
    "product": jnp.multiply,
    "sum": jnp.add,
}


class BAMChannelGate(nnx.Module):
    """Global mean -> Linear C->C/r -> BatchNorm1d -> ReLU -> Linear C/r->C: NHWC -> (N, C)."""

    def __init__(self, channels: int, hidden: int, *, rngs: nnx.Rngs, **dt):
        self.fc1 = linear(channels, hidden, rngs=rngs, **dt)
        self.bn = BatchNorm(hidden, rngs=rngs, **dt)
        self.fc2 = linear(hidden, channels, rngs=rngs, **dt)

    def __call__(self, x: jax.Array) -> jax.Array:
        s = global_mean(x).astype(x.dtype)
        return self.fc2(jax.nn.relu(self.bn(self.fc1(s))))


def phase_conv3x3(conv: nnx.Conv, x: jax.Array) -> jax.Array:
    """`conv` (3x3, dilation d, padding d) on NHWC (N, H, W, C) as an undilated 3x3 conv.

    Polyphase identity: the dilated conv equals a 3x3 conv with padding 1 on each of the d*d
    sub-images x[:, i::d, j::d], folded into the batch. H and W are zero-padded up to multiples
    of d first (those rows lie in the original zero padding) and the output is cropped back.
    XLA's backward of this form is much faster than of the dilated one. -> (N, H, W, C_out).
    """
    d = conv.kernel_dilation[0]
    if d == 1:
        return conv(x)
    n, h, w, c = x.shape
    hd, wd = -(-h // d), -(-w // d)
    x = jnp.pad(x, ((0, 0), (0, hd * d - h), (0, wd * d - w), (0, 0)))
    x = x.reshape(n, hd, d, wd, d, c).transpose(0, 2, 4, 1, 3, 5).reshape(n * d * d, hd, wd, c)
    kernel = conv.kernel[...]
    bias = conv.bias[...] if conv.bias is not None else None
    x, kernel, bias = conv.promote_dtype((x, kernel, bias), dtype=conv.dtype)
    y = lax.conv_general_dilated(
        x,
        kernel,
        window_strides=(1, 1),
        padding=((1, 1), (1, 1)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=conv.precision,
    )
    if bias is not None:
        y = y + bias
    y = y.reshape(n, d, d, hd, wd, -1).transpose(0, 3, 1, 4, 2, 5).reshape(n, hd * d, wd * d, -1)
    return y[:, :h, :w]


class BAMSpatialGate(nnx.Module):
    """1x1 reduce -> `num_dilated` dilated 3x3 convs (each + BN + ReLU) -> 1x1 to one map.

    NHWC (N, H, W, C) -> (N, H, W, 1). `formulation` (layers.tap_convs.FORMULATIONS, "auto"
    or a `policy.Rule`) says how the convs are computed: "conv" runs the dilated ones in
    polyphase form (`phase_conv3x3`), "shifts"/"im2col" run every conv by that formulation,
    "auto" the one measured fastest on this device at this H x W (layers.policy, op "bam").
    """

    def __init__(
        self,
        channels: int,
        hidden: int,
        dilation: int,
        num_dilated: int,
        *,
        rngs: nnx.Rngs,
        formulation: str | Rule = "auto",
        **dt,
    ):
        check_formulation("bam", formulation)
        self.formulation = formulation
        self.reduce = conv2d(channels, hidden, 1, bias=True, rngs=rngs, **dt)
        self.reduce_bn = BatchNorm(hidden, rngs=rngs, **dt)
        self.dilated = nnx.List(
            [
                conv2d(hidden, hidden, 3, dilation=dilation, bias=True, rngs=rngs, **dt)
                for _ in range(num_dilated)
            ]
        )
        self.dilated_bn = nnx.List([BatchNorm(hidden, rngs=rngs, **dt) for _ in range(num_dilated)])
        self.final = conv2d(hidden, 1, 1, bias=True, rngs=rngs, **dt)

    def __call__(self, x: jax.Array) -> jax.Array:
        form = resolve("bam", self.formulation, x.shape[1] * x.shape[2])
        y = jax.nn.relu(self.reduce_bn(apply_conv(self.reduce, x, form)))
        for conv, bn in zip(self.dilated, self.dilated_bn, strict=True):
            y = phase_conv3x3(conv, y) if form == "conv" else apply_conv(conv, y, form)
            y = jax.nn.relu(bn(y))
        return apply_conv(self.final, y, form)


class BAM(nnx.Module):
    """Bottleneck Attention Module; NHWC (N, H, W, C) -> same shape.

    `formulation` says how the spatial branch's convs are computed (BAMSpatialGate).
    """

    def __init__(
        self,
        channels: int,
        reduction: int = 16,
        dilation: int = 4,
        *,
        num_dilated: int = 2,
        combine: str = "product",
        rngs: nnx.Rngs,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        formulation: str | Rule = "auto",
    ):
        check_choice("combine", combine, list(COMBINES))
        check_positive("channels", channels)
        check_positive("reduction", reduction)
        check_positive("dilation", dilation)
        if num_dilated < 0:
            raise ValueError(f"num_dilated must be >= 0, got {num_dilated}")
        hidden = channels // reduction
        check_positive(
            "the hidden width", hidden, f" (channels={channels} // reduction={reduction})"
        )
        dt = dict(dtype=dtype, param_dtype=param_dtype)
        self.channels = channels
        self.combine = combine
        self.dtype = dtype
        self.channel = BAMChannelGate(channels, hidden, rngs=rngs, **dt)
        self.spatial = BAMSpatialGate(
            channels, hidden, dilation, num_dilated, rngs=rngs, formulation=formulation, **dt
        )

    def gate(self, x: jax.Array) -> jax.Array:
        """The attention `1 + sigmoid(...)` (N, H, W, C) in float32 for an NHWC input."""
        c = self.channel(x).astype(jnp.float32)[:, None, None, :]
        s = self.spatial(x).astype(jnp.float32)
        return 1.0 + jax.nn.sigmoid(COMBINES[self.combine](c, s))

    def __call__(self, x: jax.Array) -> jax.Array:
        check_nhwc(x, self.channels, "BAM")
        x = x.astype(self.dtype)
        return x * self.gate(x).astype(self.dtype)
