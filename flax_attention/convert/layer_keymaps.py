"""Key maps of the attention modules, as their reference implementations name them.

official: senet.pytorch (SE), Jongchan/attention-module (CBAM, BAM), murufeng/EPSANet (PSA).
timm: timm's SEModule and CbamModule.
"""

from __future__ import annotations

from flax_attention.convert.keymap import Child, Layer, register
from flax_attention.layers import BAM, CBAM, PSA, SE, ChannelGate, SpatialGate


@register(SE, "official")
def _se_official(m: SE):
    return [Layer("fc.0", "fc1", "linear"), Layer("fc.2", "fc2", "linear")]


@register(SE, "timm")
def _se_timm(m: SE):
    return [Layer("fc1", "fc1", "conv1x1_linear"), Layer("fc2", "fc2", "conv1x1_linear")]


@register(ChannelGate, "official")
def _channel_gate_official(m: ChannelGate):
    return [Layer("mlp.1", "fc1", "linear"), Layer("mlp.3", "fc2", "linear")]


@register(ChannelGate, "timm")
def _channel_gate_timm(m: ChannelGate):
    return [Layer("fc1", "fc1", "conv1x1_linear"), Layer("fc2", "fc2", "conv1x1_linear")]


@register(SpatialGate, "official")
def _spatial_gate_official(m: SpatialGate):
    return [Layer("spatial.conv", "conv", "conv"), Layer("spatial.bn", "bn", "bn")]


@register(SpatialGate, "timm")
def _spatial_gate_timm(m: SpatialGate):
    return [Layer("conv.conv", "conv", "conv"), Layer("conv.bn", "bn", "bn")]


@register(CBAM, "official")
def _cbam_official(m: CBAM):
    spatial = [Child("SpatialGate", "spatial_gate")] if m.spatial_gate is not None else []
    return [Child("ChannelGate", "channel_gate"), *spatial]


@register(CBAM, "timm")
def _cbam_timm(m: CBAM):
    spatial = [Child("spatial", "spatial_gate")] if m.spatial_gate is not None else []
    return [Child("channel", "channel_gate"), *spatial]


@register(BAM, "official")
def _bam_official(m: BAM):
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


@register(PSA, "official")
def _psa_official(m: PSA):
    branches = [Layer(f"conv_{i + 1}", f"convs.{i}", "conv") for i in range(len(m.convs))]
    return [
        *branches,
        Layer("se.fc1", "se.fc1", "conv1x1_linear"),
        Layer("se.fc2", "se.fc2", "conv1x1_linear"),
    ]
