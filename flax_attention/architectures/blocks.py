"""ResNet residual blocks (NHWC) with a pluggable attention module, and EPSANet's PSA block.

References: torchvision models/resnet.py (BasicBlock, Bottleneck; stride on the 3x3 conv),
senet.pytorch and timm (SE after the last BatchNorm, before the residual add),
Jongchan/attention-module MODELS/model_resnet.py (CBAM in the same place), murufeng/EPSANet
models/epsanet.py (EPSABlock: PSA replaces the 3x3 conv and holds the stride).
"""

from __future__ import annotations

from collections.abc import Callable
from types import MappingProxyType

import jax
import jax.numpy as jnp
from flax import nnx

from flax_attention.layers import BAM, CBAM, PSA, SE, ChannelGate
from flax_attention.layers.batch_norm import BatchNorm
from flax_attention.layers.common import (
    Dtype,
    check_choice,
    check_nhwc,
    check_positive,
    conv2d,
    pointwise_conv,
)
from flax_attention.layers.norm_gate import FUSED_POOLS, batch_norm_channel_gate
from flax_attention.layers.policy import AUTO, Formulations

AttentionFactory = Callable[..., nnx.Module]
NO_FORMULATIONS: Formulations = MappingProxyType({})  # every operation "auto"

# Preset name -> factory(channels, formulations, *, rngs, dtype, param_dtype).
ATTENTION_PRESETS: dict[str, Callable[..., nnx.Module]] = {
    "se": lambda c, f, **kw: SE(c, 16, bias=False, **kw),  # senet.pytorch
    "se_timm": lambda c, f, **kw: SE(c, 16, bias=True, rd_divisor=8, **kw),  # timm SEModule
    "cbam": lambda c, f, **kw: CBAM(  # Jongchan
        c, 16, variant="official", formulation=f.get("cbam", AUTO), **kw
    ),
    "cbam_timm": lambda c, f, **kw: CBAM(  # timm CbamModule
        c, 16, variant="timm", formulation=f.get("cbam", AUTO), **kw
    ),
    "bam": lambda c, f, **kw: BAM(c, 16, formulation=f.get("bam", AUTO), **kw),  # Jongchan
}


def make_attention(
    attention: str | AttentionFactory | None,
    channels: int,
    *,
    rngs: nnx.Rngs,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
    formulations: Formulations = NO_FORMULATIONS,
) -> nnx.Module | None:
    """Build `attention` for `channels`: None, a preset name (built with the `formulations` of
    its operation, layers.policy), or a factory called as `f(channels, *, rngs, dtype,
    param_dtype)`."""
    dt = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    if attention is None:
        return None
    if isinstance(attention, str):
        check_choice("attention", attention, list(ATTENTION_PRESETS))
        return ATTENTION_PRESETS[attention](channels, formulations, **dt)
    if callable(attention):
        return attention(channels, **dt)
    raise ValueError(
        f"attention must be None, one of {list(ATTENTION_PRESETS)} or a factory "
        f"f(channels, *, rngs, dtype, param_dtype) -> nnx.Module; got {attention!r}"
    )


class Downsample(nnx.Module):
    """Projection shortcut: 1x1 conv with the stride (no bias) -> BatchNorm; NHWC."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, *, rngs, **dt):
        self.conv = pointwise_conv(in_channels, out_channels, stride=stride, rngs=rngs, **dt)
        self.bn = BatchNorm(out_channels, rngs=rngs, **dt)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.bn(self.conv(x))


def make_shortcut(
    in_channels: int, out_channels: int, stride: int, *, rngs: nnx.Rngs, **dt
) -> Downsample | None:
    """A projection when the stride or the width changes, else None (identity)."""
    if stride == 1 and in_channels == out_channels:
        return None
    return Downsample(in_channels, out_channels, stride, rngs=rngs, **dt)


def _check_block_args(in_channels: int, planes: int, stride: int) -> None:
    check_positive("in_channels", in_channels)
    check_positive("planes", planes)
    check_positive("stride", stride)


class BasicBlock(nnx.Module):
    """3x3 (stride) -> BN -> ReLU -> 3x3 -> BN -> attention -> + shortcut -> ReLU.

    NHWC (N, H, W, in_channels) -> (N, ceil(H/stride), ceil(W/stride), planes). `attention` is
    built by `make_attention` with `dtype`, `param_dtype` and `formulations`.
    """

    expansion = 1

    def __init__(
        self,
        in_channels: int,
        planes: int,
        stride: int = 1,
        *,
        attention: str | AttentionFactory | None = None,
        rngs: nnx.Rngs,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        formulations: Formulations = NO_FORMULATIONS,
    ):
        _check_block_args(in_channels, planes, stride)
        dt = dict(dtype=dtype, param_dtype=param_dtype)
        out_channels = planes * self.expansion
        self.in_channels = in_channels
        self.dtype = dtype
        self.conv1 = conv2d(in_channels, planes, 3, stride=stride, rngs=rngs, **dt)
        self.bn1 = BatchNorm(planes, rngs=rngs, **dt)
        self.conv2 = conv2d(planes, planes, 3, rngs=rngs, **dt)
        self.bn2 = BatchNorm(planes, rngs=rngs, **dt)
        self.attention = make_attention(
            attention, out_channels, rngs=rngs, formulations=formulations, **dt
        )
        self.downsample = make_shortcut(in_channels, out_channels, stride, rngs=rngs, **dt)

    def __call__(self, x: jax.Array) -> jax.Array:
        check_nhwc(x, self.in_channels, type(self).__name__)
        x = x.astype(self.dtype)
        y = jax.nn.relu(self.bn1(self.conv1(x)))
        return _finish(self, x, self.conv2(y), self.bn2)


class Bottleneck(nnx.Module):
    """1x1 -> BN -> ReLU -> 3x3 (stride) -> BN -> ReLU -> 1x1 (x4) -> BN -> attention -> add -> ReLU.

    NHWC (N, H, W, in_channels) -> (N, ceil(H/stride), ceil(W/stride), 4 * planes). `attention`
    is built by `make_attention` with `dtype`, `param_dtype` and `formulations`.
    """

    expansion = 4

    def __init__(
        self,
        in_channels: int,
        planes: int,
        stride: int = 1,
        *,
        attention: str | AttentionFactory | None = None,
        rngs: nnx.Rngs,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        formulations: Formulations = NO_FORMULATIONS,
    ):
        _check_block_args(in_channels, planes, stride)
        dt = dict(dtype=dtype, param_dtype=param_dtype)
        out_channels = planes * self.expansion
        self.in_channels = in_channels
        self.dtype = dtype
        self.conv1 = pointwise_conv(in_channels, planes, rngs=rngs, **dt)
        self.bn1 = BatchNorm(planes, rngs=rngs, **dt)
        self.conv2 = conv2d(planes, planes, 3, stride=stride, rngs=rngs, **dt)
        self.bn2 = BatchNorm(planes, rngs=rngs, **dt)
        self.conv3 = pointwise_conv(planes, out_channels, rngs=rngs, **dt)
        self.bn3 = BatchNorm(out_channels, rngs=rngs, **dt)
        self.attention = make_attention(
            attention, out_channels, rngs=rngs, formulations=formulations, **dt
        )
        self.downsample = make_shortcut(in_channels, out_channels, stride, rngs=rngs, **dt)

    def __call__(self, x: jax.Array) -> jax.Array:
        check_nhwc(x, self.in_channels, type(self).__name__)
        x = x.astype(self.dtype)
        y = jax.nn.relu(self.bn1(self.conv1(x)))
        y = jax.nn.relu(self.bn2(self.conv2(y)))
        return _finish(self, x, self.conv3(y), self.bn3)


class EPSABlock(nnx.Module):
    """EPSANet bottleneck: 1x1 -> BN -> ReLU -> PSA (stride) -> BN -> ReLU -> 1x1 (x4) -> BN.

    Then + shortcut -> ReLU. PSA(planes, planes) with kernels (3, 5, 7, 9) and groups
    (1, 4, 8, 16), computed as `formulations["psa"]` says, replaces the 3x3 conv. NHWC (N, H, W, in) -> (N, H/stride, W/stride, 4 * planes).
    """

    expansion = 4

    def __init__(
        self,
        in_channels: int,
        planes: int,
        stride: int = 1,
        *,
        rngs: nnx.Rngs,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        formulations: Formulations = NO_FORMULATIONS,
    ):
        _check_block_args(in_channels, planes, stride)
        dt = dict(dtype=dtype, param_dtype=param_dtype)
        out_channels = planes * self.expansion
        self.in_channels = in_channels
        self.dtype = dtype
        self.conv1 = pointwise_conv(in_channels, planes, rngs=rngs, **dt)
        self.bn1 = BatchNorm(planes, rngs=rngs, **dt)
        psa_formulation = formulations.get("psa", AUTO)
        self.conv2 = PSA(
            planes, planes, stride=stride, formulation=psa_formulation, rngs=rngs, **dt
        )
        self.bn2 = BatchNorm(planes, rngs=rngs, **dt)
        self.conv3 = pointwise_conv(planes, out_channels, rngs=rngs, **dt)
        self.bn3 = BatchNorm(out_channels, rngs=rngs, **dt)
        self.attention = None
        self.downsample = make_shortcut(in_channels, out_channels, stride, rngs=rngs, **dt)

    def __call__(self, x: jax.Array) -> jax.Array:
        check_nhwc(x, self.in_channels, type(self).__name__)
        x = x.astype(self.dtype)
        y = jax.nn.relu(self.bn1(self.conv1(x)))
        y = jax.nn.relu(self.bn2(self.conv2(y)))
        return _finish(self, x, self.conv3(y), self.bn3)


Block = BasicBlock | Bottleneck | EPSABlock


def _finish(block: Block, x: jax.Array, z: jax.Array, norm: BatchNorm) -> jax.Array:
    """The residual branch's last BatchNorm `norm` on its conv output `z`, the attention, then
    add the shortcut of `x` and ReLU."""
    y = _normalize_and_attend(norm, block.attention, z)
    shortcut = x if block.downsample is None else block.downsample(x)
    return jax.nn.relu(y + shortcut)


def _normalize_and_attend(norm: BatchNorm, attention: nnx.Module | None, z: jax.Array) -> jax.Array:
    """`attention(norm(z))`. In training mode, an SE, or CBAM's channel gate, that pools within
    FUSED_POOLS runs fused with `norm` (layers.norm_gate: its pools and product cost no pass of
    their own); CBAM's spatial gate follows it as usual."""
    if attention is None:
        return norm(z)
    gate, spatial = attention, None
    if isinstance(attention, CBAM):
        gate, spatial = attention.channel_gate, attention.spatial_gate
    fusable = (
        isinstance(gate, SE | ChannelGate)
        and set(gate.pool_types) <= set(FUSED_POOLS)
        and not norm.use_running_average
    )
    if not fusable:
        return attention(norm(z))
    y = batch_norm_channel_gate(norm, gate, z)
    return y if spatial is None else spatial(y)
