"""PSA, the Pyramid Squeeze Attention of EPSANet (Zhang et al.), NHWC.

Reference: murufeng/EPSANet models/epsanet.py (PSAModule) and models/SE_weight_module.py.
Every branch convolves all input channels (kernel k_i, groups g_i, no bias) to out/S channels;
one shared SE weight module scores each branch; a softmax across the S branches weights them;
the branches are concatenated in reverse order (largest kernel first).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from flax_attention.layers.branch_convs import branch_convs
from flax_attention.layers.common import (
    Dtype,
    check_nhwc,
    check_positive,
    conv2d,
    global_mean,
    linear,
)
from flax_attention.layers.policy import BranchShape, Rule, resolve


class SEWeight(nnx.Module):
    """EPSANet's SEWeightModule, `sigmoid(fc2(relu(fc1(pooled))))` with biases: (..., C) -> (...,
    C) float32.

    Takes the branches' H*W means (S, N, C) directly, not the feature maps, so the S branches
    share one call.
    """

    def __init__(self, channels: int, hidden: int, *, rngs: nnx.Rngs, **dt):
        self.fc1 = linear(channels, hidden, rngs=rngs, **dt)
        self.fc2 = linear(hidden, channels, rngs=rngs, **dt)

    def __call__(self, pooled: jax.Array) -> jax.Array:
        return jax.nn.sigmoid(self.fc2(jax.nn.relu(self.fc1(pooled))).astype(jnp.float32))


class PSA(nnx.Module):
    """Pyramid Squeeze Attention; NHWC (N, H, W, in) -> (N, ceil(H/s), ceil(W/s), out).

    `formulation` says how the grouped branch convolutions run: a `branch_convs.FORMULATIONS`
    name, a `policy.Rule`, or "auto", this device's measured plan (layers.policy, op "psa";
    "grouped" where unmeasured); parameters and results are the same for every choice.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_sizes: Sequence[int] = (3, 5, 7, 9),
        groups: Sequence[int] = (1, 4, 8, 16),
        stride: int = 1,
        *,
        reduction: int = 16,
        formulation: str | Rule = "auto",
        rngs: nnx.Rngs,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
    ):
        kernel_sizes, groups = tuple(kernel_sizes), tuple(groups)
        _validate(in_channels, out_channels, kernel_sizes, groups, stride, reduction)
        split = out_channels // len(kernel_sizes)
        shape = BranchShape(in_channels, split, kernel_sizes, groups)
        chosen = resolve("psa", formulation, shape)
        self.formulations = (chosen,) * len(kernel_sizes) if isinstance(chosen, str) else chosen
        self.groups, self.stride = groups, stride
        dt = dict(dtype=dtype, param_dtype=param_dtype)
        self.in_channels = in_channels
        self.dtype = dtype
        self.convs = nnx.List(
            [
                conv2d(in_channels, split, k, stride=stride, groups=g, rngs=rngs, **dt)
                for k, g in zip(kernel_sizes, groups, strict=True)
            ]
        )
        self.se = SEWeight(split, split // reduction, rngs=rngs, **dt)

    def __call__(self, x: jax.Array) -> jax.Array:
        check_nhwc(x, self.in_channels, "PSA")
        x = x.astype(self.dtype)
        kernels = [conv.kernel[...].astype(self.dtype) for conv in self.convs]
        branches = list(zip(kernels, self.groups, strict=True))
        feats = branch_convs(x, branches, self.stride, self.formulations)
        pooled = jnp.stack([global_mean(f) for f in feats])  # (S, N, split), float32
        weights = jax.nn.softmax(self.se(pooled.astype(self.dtype)), axis=0)
        weighted = [
            f * w[:, None, None, :].astype(self.dtype) for f, w in zip(feats, weights, strict=True)
        ]
        return jnp.concatenate(weighted[::-1], axis=-1)


def _validate(
    in_channels: int,
    out_channels: int,
    kernel_sizes: tuple[int, ...],
    groups: tuple[int, ...],
    stride: int,
    reduction: int,
) -> None:
    check_positive("in_channels", in_channels)
    check_positive("stride", stride)
    check_positive("reduction", reduction)
    if len(kernel_sizes) != len(groups) or not kernel_sizes:
        raise ValueError(
            f"kernel_sizes {kernel_sizes} and groups {groups} must be non-empty and of equal length"
        )
    branches = len(kernel_sizes)
    if out_channels < branches or out_channels % branches:
        raise ValueError(
            f"out_channels={out_channels} must be a positive multiple of the {branches} branches"
        )
    split = out_channels // branches
    for k in kernel_sizes:
        if k < 1 or k % 2 == 0:
            raise ValueError(f"kernel_sizes must be positive odd numbers, got {kernel_sizes}")
    for g in groups:
        if g < 1 or in_channels % g or split % g:
            raise ValueError(
                f"groups entry {g} must divide in_channels={in_channels} and the branch width "
                f"out_channels/{branches}={split}"
            )
    check_positive(
        "the SE hidden width",
        split // reduction,
        f" (branch width {split} // reduction={reduction})",
    )
