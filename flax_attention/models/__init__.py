"""ResNet-family models (NHWC) with SE, CBAM, BAM or PSA attention, and their registry."""

from flax_attention.architectures.blocks import (
    ATTENTION_PRESETS,
    BasicBlock,
    Bottleneck,
    Downsample,
    EPSABlock,
    make_attention,
)
from flax_attention.architectures.resnet import ResNet
from flax_attention.models.pretrained import (
    HUB_WEIGHTS,
    HubWeights,
    WeightsNotFoundError,
    pretrained_weights,
    resolve_weights,
)
from flax_attention.models.registry import (
    MODELS,
    ModelSpec,
    create_model,
    get_spec,
    list_models,
    natural_key,
)

__all__ = [
    "ATTENTION_PRESETS",
    "HUB_WEIGHTS",
    "MODELS",
    "BasicBlock",
    "Bottleneck",
    "Downsample",
    "EPSABlock",
    "HubWeights",
    "ModelSpec",
    "ResNet",
    "WeightsNotFoundError",
    "create_model",
    "get_spec",
    "list_models",
    "make_attention",
    "natural_key",
    "pretrained_weights",
    "resolve_weights",
]
