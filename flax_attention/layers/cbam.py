"""CBAM (Woo et al.): a channel gate then a spatial gate, each multiplying the input.

References: Jongchan/attention-module MODELS/cbam.py (`variant="official"`: MLP with biases,
hidden C//r, spatial descriptor [max, mean], BatchNorm momentum 0.01) and timm
layers/cbam.py CbamModule (`variant="timm"`: MLP without biases, hidden round(C/r),
descriptor [mean, max], BatchNorm momentum 0.1).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

from flax_attention.layers.batch_norm import BatchNorm
from flax_attention.layers.common import (
    Dtype,
    check_choice,
    check_nhwc,
    check_positive,
    conv2d,
    linear,
)
from flax_attention.layers.policy import Rule, check_formulation, resolve
from flax_attention.layers.tap_convs import apply_conv

Pool = Callable[[jax.Array, tuple[int, ...]], jax.Array]

# Reductions in float32 over `axes` of an NHWC array.
POOLS: dict[str, Pool] = {
    "avg": lambda x, axes: jnp.mean(x, axis=axes, dtype=jnp.float32),
    "max": lambda x, axes: jnp.max(x, axis=axes).astype(jnp.float32),
    "lp": lambda x, axes: jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32)), axis=axes)),
    "lse": lambda x, axes: jax.nn.logsumexp(x.astype(jnp.float32), axis=axes),
}
CHANNEL_POOLS = ("avg", "max", "lp", "lse")


@jax.custom_vjp
def mean_and_max_over_channels(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The mean and the maximum over C of NHWC x (N, H, W, C), each (N, H, W) float32, in one
    reduction that also counts the channels holding the maximum.

    Gradients are autodiff's (the maximum's shared evenly between tied channels, as jnp.max and
    timm's `amax` do), but the backward is one elementwise pass over x: autodiff of the two
    reductions instead counts the ties in a reduction of its own and stores an (N, H, W, C)
    mask for it.
    """
    mean, peak, _ = _pools_over_channels(x)
    return mean, peak


def _pools_over_channels(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(mean, max, how many channels hold the max), each float32 (N, H, W), over the last axis
    of x, as one variadic reduction (NaN propagates to the max, as in jnp.max)."""

    def combine(a, b):
        (sa, va, ca), (sb, vb, cb) = a, b
        peak = jnp.maximum(va, vb)  # NaN-propagating
        ties = jnp.where(va == peak, ca, 0.0) + jnp.where(vb == peak, cb, 0.0)
        return sa + sb, peak, ties

    x32 = x.astype(jnp.float32)  # exact; a variadic reduction takes one float type
    init = (jnp.array(0, jnp.float32), jnp.array(-jnp.inf, jnp.float32), jnp.array(0, jnp.float32))
    operands = (x32, x32, jnp.ones_like(x32))
    total, peak, ties = jax.lax.reduce(operands, init, combine, (x.ndim - 1,))
    return total / x.shape[-1], peak, ties


def _pools_fwd(x):
    mean, peak, ties = _pools_over_channels(x)
    return (mean, peak), (x, peak, ties)


def _pools_bwd(residuals, cotangents):
    x, peak, ties = residuals
    d_mean, d_max = cotangents
    at_max = x.astype(jnp.float32) == peak[..., None]
    dx = (d_mean / x.shape[-1])[..., None] + jnp.where(at_max, (d_max / ties)[..., None], 0.0)
    return (dx.astype(x.dtype),)


mean_and_max_over_channels.defvjp(_pools_fwd, _pools_bwd)


@dataclass(frozen=True)
class CBAMVariant:
    """What differs between the authors' CBAM and timm's."""

    mlp_bias: bool
    hidden_width: Callable[[int, int], int]
    spatial_descriptor: tuple[str, str]
    bn_momentum: float


VARIANTS: dict[str, CBAMVariant] = {
    "official": CBAMVariant(True, lambda c, r: c // r, ("max", "avg"), 0.01),
    "timm": CBAMVariant(False, lambda c, r: max(1, int(c / r + 0.5)), ("avg", "max"), 0.1),
}


class ChannelGate(nnx.Module):
    """`x * sigmoid(sum_p mlp(pool_p(x)))` with one shared MLP; NHWC (N, H, W, C) -> same."""

    def __init__(
        self,
        channels: int,
        reduction: int = 16,
        *,
        pool_types: Sequence[str] = ("avg", "max"),
        variant: str = "official",
        rngs: nnx.Rngs,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
    ):
        check_choice("variant", variant, list(VARIANTS))
        check_positive("channels", channels)
        check_positive("reduction", reduction)
        if not pool_types:
            raise ValueError(f"pool_types must name at least one of {list(CHANNEL_POOLS)}")
        for pool in pool_types:
            check_choice("pool_types entry", pool, CHANNEL_POOLS)
        spec = VARIANTS[variant]
        hidden = spec.hidden_width(channels, reduction)
        check_positive(
            "the hidden width", hidden, f" (channels={channels} // reduction={reduction})"
        )
        self.channels = channels
        self.pool_types = tuple(pool_types)
        self.dtype = dtype
        kw = dict(bias=spec.mlp_bias, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.fc1 = linear(channels, hidden, **kw)
        self.fc2 = linear(hidden, channels, **kw)

    def excite(self, pooled: Mapping[str, jax.Array]) -> jax.Array:
        """The channel attention (N, C) in float32 from the H*W pools named in `pool_types`,
        each (N, C) float32: `sigmoid(sum_p mlp(pooled[p]))`.

        The one definition of the gate: the fused path (layers.norm_gate) calls it too.
        """
        total = 0.0
        for pool in self.pool_types:
            s = pooled[pool].astype(self.dtype)
            total = total + self.fc2(jax.nn.relu(self.fc1(s))).astype(jnp.float32)
        return jax.nn.sigmoid(total)

    def gate(self, x: jax.Array) -> jax.Array:
        """The channel attention (N, C) in float32 for an NHWC input."""
        return self.excite({pool: POOLS[pool](x, (1, 2)) for pool in self.pool_types})

    def __call__(self, x: jax.Array) -> jax.Array:
        check_nhwc(x, self.channels, "ChannelGate")
        x = x.astype(self.dtype)
        return x * self.gate(x)[:, None, None, :].astype(self.dtype)


class SpatialGate(nnx.Module):
    """`x * sigmoid(bn(conv_kxk([pool_a over C, pool_b over C])))`; NHWC -> same shape.

    `formulation` ("auto", "conv", "shifts", "im2col" or a `policy.Rule`; layers.tap_convs)
    says how the kxk conv is computed; the parameters and the sums are the same. "auto": the
    formulation measured fastest on this device at this H x W (layers.policy, op "cbam").
    """

    def __init__(
        self,
        kernel_size: int = 7,
        *,
        variant: str = "official",
        rngs: nnx.Rngs,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        formulation: str | Rule = "auto",
    ):
        check_choice("variant", variant, list(VARIANTS))
        check_formulation("cbam", formulation)
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd number, got {kernel_size}")
        spec = VARIANTS[variant]
        self.descriptor = spec.spatial_descriptor
        self.dtype = dtype
        self.formulation = formulation
        self.conv = conv2d(2, 1, kernel_size, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.bn = BatchNorm(
            1, momentum=spec.bn_momentum, rngs=rngs, dtype=dtype, param_dtype=param_dtype
        )

    def excite(self, pooled: Mapping[str, jax.Array]) -> jax.Array:
        """The spatial attention (N, H, W, 1) in float32 from the pools over C named in
        `descriptor`, each (N, H, W) float32: `sigmoid(bn(conv([pooled[a], pooled[b]])))`.
        """
        s = jnp.stack([pooled[p] for p in self.descriptor], axis=-1).astype(self.dtype)
        form = resolve("cbam", self.formulation, s.shape[1] * s.shape[2])
        y = apply_conv(self.conv, s, form)
        return jax.nn.sigmoid(self.bn(y).astype(jnp.float32))

    def gate(self, x: jax.Array) -> jax.Array:
        """The spatial attention (N, H, W, 1) in float32 for an NHWC input."""
        mean, peak = mean_and_max_over_channels(x)
        return self.excite({"avg": mean, "max": peak})

    def __call__(self, x: jax.Array) -> jax.Array:
        if x.ndim != 4:
            raise ValueError(f"SpatialGate expects a rank-4 NHWC input; got shape {x.shape}")
        x = x.astype(self.dtype)
        return x * self.gate(x).astype(self.dtype)


class CBAM(nnx.Module):
    """Channel gate followed by spatial gate (no residual of its own); NHWC -> same shape.

    `formulation` says how the spatial gate's conv is computed (SpatialGate). Inside a residual
    block in training mode the channel gate runs fused with the block's last BatchNorm
    (layers.norm_gate).
    """

    def __init__(
        self,
        channels: int,
        reduction: int = 16,
        kernel_size: int = 7,
        *,
        pool_types: Sequence[str] = ("avg", "max"),
        spatial: bool = True,
        variant: str = "official",
        rngs: nnx.Rngs,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        formulation: str | Rule = "auto",
    ):
        kw = dict(variant=variant, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.channels = channels
        self.channel_gate = ChannelGate(channels, reduction, pool_types=pool_types, **kw)
        self.spatial_gate = (
            SpatialGate(kernel_size, formulation=formulation, **kw) if spatial else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        check_nhwc(x, self.channels, "CBAM")
        x = x.astype(self.channel_gate.dtype)
        x = self.channel_gate(x)
        if self.spatial_gate is not None:
            x = self.spatial_gate(x)
        return x
