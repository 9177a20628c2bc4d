"""ResNet backbone (NHWC) with torchvision's stem and head, optional attention between stages.

Reference: torchvision models/resnet.py. Stem: 7x7/2 conv (padding 3, no bias) -> BN -> ReLU ->
3x3/2 max pool (padding 1 with -inf). Stages of widths 64, 128, 256, 512 (times the block's
expansion) with strides 1, 2, 2, 2. Head: global mean -> Linear. Jongchan's BAM ResNets put a
BAM after every stage but the last (`stage_attention="bam"`); their fixed 7x7 average pool is
the global mean at 224x224 input.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from flax_attention.architectures.blocks import NO_FORMULATIONS, AttentionFactory, make_attention
from flax_attention.architectures.stem import StemConv
from flax_attention.kernels.max_pool import max_pool_3x3_s2
from flax_attention.layers.batch_norm import BatchNorm
from flax_attention.layers.common import (
    Dtype,
    check_nhwc,
    check_positive,
    global_mean,
    linear,
)
from flax_attention.layers.policy import AUTO, Formulations, check_formulations

STEM_WIDTH = 64


class ResNet(nnx.Module):
    """ResNet on NHWC images (N, H, W, in_channels) -> logits (N, num_classes).

    `block` is BasicBlock, Bottleneck or EPSABlock; `layers` the number of blocks per stage.
    `attention` (None, preset name or factory) goes inside every block; `stage_attention` after
    every stage except the last, both built with `dtype` and `param_dtype`. In training mode each
    block's SE, or CBAM's channel gate, runs fused with the BatchNorm before it
    (layers.norm_gate). `formulations` says how operations with several formulations are
    computed (layers.policy: operation -> formulation, "auto" for those not named).
    `model(x, return_features=True)` returns `(logits, [stage1, ...,
    stageS])`, each stage output (after its stage attention) in NHWC.
    """

    def __init__(
        self,
        block: type,
        layers: Sequence[int],
        *,
        num_classes: int = 1000,
        attention: str | AttentionFactory | None = None,
        stage_attention: str | AttentionFactory | None = None,
        in_channels: int = 3,
        rngs: nnx.Rngs,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        formulations: Formulations = NO_FORMULATIONS,
    ):
        check_positive("num_classes", num_classes)
        check_formulations(formulations)
        check_positive("in_channels", in_channels)
        if not layers or any(n < 1 for n in layers):
            raise ValueError(f"layers must be a non-empty list of positive counts, got {layers}")
        dt = dict(dtype=dtype, param_dtype=param_dtype)
        block_kw = {"formulations": formulations}
        if attention is not None:
            block_kw["attention"] = attention
        self.in_channels = in_channels
        self.dtype = dtype
        stem = formulations.get("stem", AUTO)
        self.conv1 = StemConv(in_channels, STEM_WIDTH, 7, 2, rngs=rngs, formulation=stem, **dt)
        self.bn1 = BatchNorm(STEM_WIDTH, rngs=rngs, **dt)
        stages, width = [], STEM_WIDTH
        for i, depth in enumerate(layers):
            planes = STEM_WIDTH * 2**i
            blocks = []
            for j in range(depth):
                stride = 2 if i > 0 and j == 0 else 1
                blocks.append(block(width, planes, stride, rngs=rngs, **block_kw, **dt))
                width = planes * block.expansion
            stages.append(nnx.List(blocks))
        self.stages = nnx.List(stages)
        self.stage_attention = nnx.List(
            [
                make_attention(
                    stage_attention,
                    STEM_WIDTH * 2**i * block.expansion,
                    rngs=rngs,
                    formulations=formulations,
                    **dt,
                )
                for i in range(len(layers) - 1)
                if stage_attention is not None
            ]
        )
        self.num_features = width
        self.fc = linear(width, num_classes, rngs=rngs, **dt)

    def __call__(
        self, x: jax.Array, *, return_features: bool = False
    ) -> jax.Array | tuple[jax.Array, list[jax.Array]]:
        check_nhwc(x, self.in_channels, "ResNet")
        x = x.astype(self.dtype)
        x = max_pool_3x3_s2(jax.nn.relu(self.bn1(self.conv1(x))))
        features = []
        for i, stage in enumerate(self.stages):
            for block in stage:
                x = block(x)
            if i < len(self.stage_attention):
                x = self.stage_attention[i](x)
            features.append(x)
        logits = self.fc(global_mean(x).astype(self.dtype))
        return (logits, features) if return_features else logits
