"""Key maps of the ResNet blocks and backbone, shared by every layout.

The layouts name convolutions, BatchNorms, stages and downsampling as torchvision does; they
differ only in the PyTorch attribute that holds an attention module (`AttentionKeys`).
"""

from __future__ import annotations

from collections.abc import Mapping

from flax_attention.architectures import BasicBlock, Bottleneck, Downsample, ResNet
from flax_attention.convert.tables import Child, Entry, KeyMap, Layer, Table

AttentionKeys = Mapping[type, str]  # attention module class -> its PyTorch attribute name
DEFAULT_ATTENTION_KEY = "attention"


def attention_key(module: object, keys: AttentionKeys) -> str:
    """The PyTorch name of attention `module` (`attention` if its class has none in `keys`)."""
    for cls in type(module).__mro__:
        if cls in keys:
            return keys[cls]
    return DEFAULT_ATTENTION_KEY


def _block_table(keys: AttentionKeys, num_convs: int) -> Table:
    def table(m: BasicBlock | Bottleneck) -> list[Entry]:
        entries: list[Entry] = [
            entry
            for i in range(1, num_convs + 1)
            for entry in (Layer(f"conv{i}", f"conv{i}", "conv"), Layer(f"bn{i}", f"bn{i}", "bn"))
        ]
        if m.attention is not None:
            entries.append(Child(attention_key(m.attention, keys), "attention"))
        if m.downsample is not None:
            entries.append(Child("downsample", "downsample"))
        return entries

    return table


def _downsample(m: Downsample) -> list[Entry]:
    return [Layer("0", "conv", "conv"), Layer("1", "bn", "bn")]


def _resnet_table(keys: AttentionKeys) -> Table:
    def table(m: ResNet) -> list[Entry]:
        blocks = [
            Child(f"layer{i + 1}.{j}", f"stages.{i}.{j}")
            for i, stage in enumerate(m.stages)
            for j in range(len(stage))
        ]
        between = [
            Child(f"{attention_key(att, keys)}{i + 1}", f"stage_attention.{i}")
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


def resnet_key_map(keys: AttentionKeys) -> KeyMap:
    """Tables of BasicBlock, Bottleneck, Downsample and ResNet, attention named by `keys`."""
    return {
        BasicBlock: _block_table(keys, 2),
        Bottleneck: _block_table(keys, 3),
        Downsample: _downsample,
        ResNet: _resnet_table(keys),
    }
