"""Attention modules (NHWC) and the PyTorch-semantics helpers they share."""

from flax_attention.layers.bam import BAM
from flax_attention.layers.batch_norm import BatchNorm
from flax_attention.layers.cbam import CBAM, ChannelGate, SpatialGate
from flax_attention.layers.psa import PSA
from flax_attention.layers.se import SE

__all__ = ["BAM", "CBAM", "PSA", "SE", "BatchNorm", "ChannelGate", "SpatialGate"]
