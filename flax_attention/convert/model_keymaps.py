"""Key maps of the ResNet blocks and backbone, as the reference repositories name them.

official: torchvision (plain ResNets), senet.pytorch (`se_resnet*`), Jongchan/attention-module
(`cbam_resnet*`, `bam_resnet*`), murufeng/EPSANet (`epsanet*`). timm: `seresnet*` (timm stores
any block attention as `se`; its plain ResNet keys equal torchvision's).
"""

from __future__ import annotations

from flax_attention.convert.keymap import Child, Layer, register
from flax_attention.layers import BAM, CBAM, SE
from flax_attention.models import BasicBlock, Bottleneck, Downsample, EPSABlock, ResNet

# PyTorch attribute name of an attention module, by its class, in each layout.
ATTENTION_KEYS: dict[str, dict[type, str]] = {
    "official": {SE: "se", CBAM: "cbam", BAM: "bam"},
    "timm": {SE: "se", CBAM: "se", BAM: "se"},
}
DEFAULT_ATTENTION_KEY = "attention"


def attention_key(module: object, layout: str) -> str:
    """The PyTorch name of attention `module` in `layout` (`attention` if not a known class)."""
    for cls in type(module).__mro__:
        if cls in ATTENTION_KEYS[layout]:
            return ATTENTION_KEYS[layout][cls]
    return DEFAULT_ATTENTION_KEY


def _block_table(layout: str, num_convs: int):
    def table(m: BasicBlock | Bottleneck | EPSABlock):
        entries = [
            entry
            for i in range(1, num_convs + 1)
            for entry in (Layer(f"conv{i}", f"conv{i}", "conv"), Layer(f"bn{i}", f"bn{i}", "bn"))
        ]
        if m.attention is not None:
            entries.append(Child(attention_key(m.attention, layout), "attention"))
        if m.downsample is not None:
            entries.append(Child("downsample", "downsample"))
        return entries

    return table


for _layout in ("official", "timm"):
    register(BasicBlock, _layout)(_block_table(_layout, 2))
    register(Bottleneck, _layout)(_block_table(_layout, 3))


@register(EPSABlock, "official")
def _epsa_block(m: EPSABlock):
    return [
        Layer("conv1", "conv1", "conv"),
        Layer("bn1", "bn1", "bn"),
        Child("conv2", "conv2"),  # PSA, with its own table
        Layer("bn2", "bn2", "bn"),
        Layer("conv3", "conv3", "conv"),
        Layer("bn3", "bn3", "bn"),
        *([Child("downsample", "downsample")] if m.downsample is not None else []),
    ]


@register(Downsample, "official")
@register(Downsample, "timm")
def _downsample(m: Downsample):
    return [Layer("0", "conv", "conv"), Layer("1", "bn", "bn")]


def _resnet_table(layout: str):
    def table(m: ResNet):
        blocks = [
            Child(f"layer{i + 1}.{j}", f"stages.{i}.{j}")
            for i, stage in enumerate(m.stages)
            for j in range(len(stage))
        ]
        between = [
            Child(f"{attention_key(att, layout)}{i + 1}", f"stage_attention.{i}")
            for i, att in enumerate(m.stage_attention)
        ]
        return [
            Layer("conv1", "conv1", "conv"),
            Layer("bn1", "bn1", "bn"),
            *blocks,
            *between,
            Layer("fc", "fc", "linear"),
        ]

    return table


for _layout in ("official", "timm"):
    register(ResNet, _layout)(_resnet_table(_layout))
