"""Model registry: name -> ResNet spec (blocks, depth, attention, source, PyTorch layout)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import jax.numpy as jnp
from flax import nnx

from flax_attention.layers.common import Dtype
from flax_attention.models.blocks import BasicBlock, Bottleneck, EPSABlock
from flax_attention.models.resnet import ResNet

DEPTHS: dict[int, tuple[type, tuple[int, ...]]] = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
    101: (Bottleneck, (3, 4, 23, 3)),
    152: (Bottleneck, (3, 8, 36, 3)),
}


@dataclass(frozen=True)
class ModelSpec:
    """How to build a registered model and where its PyTorch weights come from.

    `layout` is the default `layout=` of `load_torch_state_dict` for checkpoints of `source`.
    """

    name: str
    block: type
    layers: tuple[int, ...]
    source: str
    layout: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    def build(self, *, num_classes: int, rngs: nnx.Rngs, dtype: Dtype, **kw) -> ResNet:
        return ResNet(
            self.block,
            self.layers,
            num_classes=num_classes,
            rngs=rngs,
            dtype=dtype,
            **{**self.kwargs, **kw},
        )


def _family(prefix, depths, source, layout, **kwargs) -> dict[str, ModelSpec]:
    specs = {}
    for depth in depths:
        block, layers = DEPTHS[depth]
        name = f"{prefix}{depth}"
        specs[name] = ModelSpec(name, block, layers, source, layout, kwargs)
    return specs


MODELS: dict[str, ModelSpec] = {
    **_family("resnet", (18, 34, 50, 101, 152), "torchvision", "official"),
    **_family("se_resnet", (18, 34, 50, 101, 152), "senet.pytorch", "official", attention="se"),
    **_family("seresnet", (18, 34, 50, 101, 152), "timm", "timm", attention="se_timm"),
    **_family("cbam_resnet", (18, 34, 50, 101), "Jongchan", "official", attention="cbam"),
    **_family("bam_resnet", (18, 34, 50, 101), "Jongchan", "official", stage_attention="bam"),
    "epsanet50_small": ModelSpec(
        "epsanet50_small", EPSABlock, (3, 4, 6, 3), "murufeng", "official"
    ),
    "epsanet101_small": ModelSpec(
        "epsanet101_small", EPSABlock, (3, 4, 23, 3), "murufeng", "official"
    ),
}


def list_models() -> list[str]:
    """The registered model names, sorted."""
    return sorted(MODELS)


def get_spec(name: str) -> ModelSpec:
    """The spec of model `name`; a ValueError listing the names if it is unknown."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; registered models: {', '.join(list_models())}")
    return MODELS[name]


def create_model(
    name: str,
    *,
    num_classes: int = 1000,
    rngs: nnx.Rngs,
    dtype: Dtype = jnp.float32,
    **kw: Any,
) -> ResNet:
    """Build registered model `name` (see `list_models()`); NHWC in, logits (N, num_classes) out.

    Extra keywords go to `ResNet` (e.g. `param_dtype`, `in_channels`, `attention`).
    """
    return get_spec(name).build(num_classes=num_classes, rngs=rngs, dtype=dtype, **kw)
