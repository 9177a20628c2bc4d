"""ResNet-family architectures (NHWC): the stem, the residual blocks with pluggable attention,
and the backbone. Below the converter; the registry and pretrained weights (flax_attention.models)
sit above both."""

from flax_attention.architectures.blocks import (
    ATTENTION_PRESETS,
    BasicBlock,
    Bottleneck,
    Downsample,
    EPSABlock,
    make_attention,
)
from flax_attention.architectures.resnet import ResNet

__all__ = [
    "ATTENTION_PRESETS",
    "BasicBlock",
    "Bottleneck",
    "Downsample",
    "EPSABlock",
    "ResNet",
    "make_attention",
]
