"""The `timm` layout: keys as timm names them.

Attention modules: timm's SEModule (SE) and CbamModule (CBAM). Models: `seresnet*`; timm stores
any block attention as `se`, and its plain ResNet keys equal torchvision's.
"""

from __future__ import annotations

from flax_attention.convert.layouts.resnet import resnet_key_map
from flax_attention.convert.tables import Child, Entry, KeyMap, Layer
from flax_attention.layers import BAM, CBAM, SE, ChannelGate, SpatialGate


def _mlp(m: SE | ChannelGate) -> list[Entry]:
    """SEModule and CbamModule's channel gate: two 1x1 convs `fc1`, `fc2`."""
    return [Layer("fc1", "fc1", "conv1x1_linear"), Layer("fc2", "fc2", "conv1x1_linear")]


def _spatial_gate(m: SpatialGate) -> list[Entry]:
    return [Layer("conv.conv", "conv", "conv"), Layer("conv.bn", "bn", "bn")]


def _cbam(m: CBAM) -> list[Entry]:
    spatial = [Child("spatial", "spatial_gate")] if m.spatial_gate is not None else []
    return [Child("channel", "channel_gate"), *spatial]


KEY_MAP: KeyMap = {
    SE: _mlp,
    ChannelGate: _mlp,
    SpatialGate: _spatial_gate,
    CBAM: _cbam,
    **resnet_key_map({SE: "se", CBAM: "se", BAM: "se"}),
}
