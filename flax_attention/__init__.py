"""flax-attention: SE, CBAM, BAM and PSA for Flax NNX, number for number the PyTorch references."""

from flax_attention.layers import BAM, CBAM, PSA, SE, BatchNorm, ChannelGate, SpatialGate

__all__ = ["BAM", "CBAM", "PSA", "SE", "BatchNorm", "ChannelGate", "SpatialGate"]
__version__ = "0.1.0"
