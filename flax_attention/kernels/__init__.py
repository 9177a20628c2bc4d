"""Pallas fused kernels for the memory-bound gates (SE, CBAM), each with a custom VJP.

Selected by the modules' `impl=` argument; `dispatch` maps impl names to Pallas backends.
"""

from flax_attention.kernels.cbam import cbam_pallas
from flax_attention.kernels.dispatch import AUTO, IMPLS, check_impl, resolve
from flax_attention.kernels.se import channel_gate_pallas

__all__ = ["AUTO", "IMPLS", "cbam_pallas", "channel_gate_pallas", "check_impl", "resolve"]
