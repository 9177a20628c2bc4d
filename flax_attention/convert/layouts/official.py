"""The `official` layout: keys as the reference implementations name them.

Attention modules: senet.pytorch (SE), Jongchan/attention-module (CBAM, BAM), murufeng/EPSANet
(PSA). Models: torchvision (plain ResNets), senet.pytorch (`se_resnet*`), Jongchan/attention-module
(`cbam_resnet*`, `bam_resnet*`), murufeng/EPSANet (`epsanet*`).
"""

from __future__ import annotations

from flax_attention.architectures import EPSABlock
from flax_attention.convert.layouts.resnet import resnet_key_map
from flax_attention.convert.tables import Child, Entry, KeyMap, Layer
from flax_attention.layers import BAM, CBAM, PSA, SE, ChannelGate, SpatialGate


def _se(m: SE) -> list[Entry]:
    return [Layer("fc.0", "fc1", "linear"), Layer("fc.2", "fc2", "linear")]


def _channel_gate(m: ChannelGate) -> list[Entry]:
    return [Layer("mlp.1", "fc1", "linear"), Layer("mlp.3", "fc2", "linear")]


def _spatial_gate(m: SpatialGate) -> list[Entry]:
    return [Layer("spatial.conv", "conv", "conv"), Layer("spatial.bn", "bn", "bn")]


def _cbam(m: CBAM) -> list[Entry]:
    spatial = [Child("SpatialGate", "spatial_gate")] if m.spatial_gate is not None else []
    return [Child("ChannelGate", "channel_gate"), *spatial]


def _bam(m: BAM) -> list[Entry]:
    c, s = "channel_att.gate_c.gate_c_", "spatial_att.gate_s.gate_s_"
    dilated = [
        entry
        for i in range(len(m.spatial.dilated))
        for entry in (
            Layer(f"{s}conv_di_{i}", f"spatial.dilated.{i}", "conv"),
            Layer(f"{s}bn_di_{i}", f"spatial.dilated_bn.{i}", "bn"),
        )
    ]
    return [
        Layer(f"{c}fc_0", "channel.fc1", "linear"),
        Layer(f"{c}bn_1", "channel.bn", "bn"),
        Layer(f"{c}fc_final", "channel.fc2", "linear"),
        Layer(f"{s}conv_reduce0", "spatial.reduce", "conv"),
        Layer(f"{s}bn_reduce0", "spatial.reduce_bn", "bn"),
        *dilated,
        Layer(f"{s}conv_final", "spatial.final", "conv"),
    ]


def _psa(m: PSA) -> list[Entry]:
    branches = [Layer(f"conv_{i + 1}", f"convs.{i}", "conv") for i in range(len(m.convs))]
    return [
        *branches,
        Layer("se.fc1", "se.fc1", "conv1x1_linear"),
        Layer("se.fc2", "se.fc2", "conv1x1_linear"),
    ]


def _epsa_block(m: EPSABlock) -> list[Entry]:
    return [
        Layer("conv1", "conv1", "conv"),
        Layer("bn1", "bn1", "bn"),
        Child("conv2", "conv2"),  # PSA, with its own table
        Layer("bn2", "bn2", "bn"),
        Layer("conv3", "conv3", "conv"),
        Layer("bn3", "bn3", "bn"),
        *([Child("downsample", "downsample")] if m.downsample is not None else []),
    ]


KEY_MAP: KeyMap = {
    SE: _se,
    ChannelGate: _channel_gate,
    SpatialGate: _spatial_gate,
    CBAM: _cbam,
    BAM: _bam,
    PSA: _psa,
    EPSABlock: _epsa_block,
    **resnet_key_map({SE: "se", CBAM: "cbam", BAM: "bam"}),
}
