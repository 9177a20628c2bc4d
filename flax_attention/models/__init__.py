"""ResNet-family models (NHWC) with SE, CBAM, BAM or PSA attention, and their registry."""

from flax_attention.models.blocks import (
    ATTENTION_PRESETS,
    BasicBlock,
    Bottleneck,
    Downsample,
    EPSABlock,
    make_attention,
)
from flax_attention.models.registry import MODELS, ModelSpec, create_model, get_spec, list_models
from flax_attention.models.resnet import ResNet

__all__ = [
    "ATTENTION_PRESETS",
    "MODELS",
    "BasicBlock",
    "Bottleneck",
    "Downsample",
    "EPSABlock",
    "ModelSpec",
    "ResNet",
    "create_model",
    "get_spec",
    "list_models",
    "make_attention",
]
