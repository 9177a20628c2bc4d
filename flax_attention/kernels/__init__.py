"""Fused kernels for the memory-bound gates (SE, CBAM), each with a custom VJP.

`passes` holds the steps over one tile, `executors` runs them (XLA, `pl.pallas_call`, Mosaic
GPU), `se` and `cbam` schedule them around the modules' own gate math (their `excite` methods)
with the pieces in `schedule`; the modules' `impl=` picks the executor (`dispatch`).
"""

from flax_attention.kernels.cbam import cbam_fused
from flax_attention.kernels.dispatch import AUTO, IMPLS, check_impl, fused_executor, resolve
from flax_attention.kernels.se import channel_gate_fused

__all__ = [
    "AUTO",
    "IMPLS",
    "cbam_fused",
    "channel_gate_fused",
    "check_impl",
    "fused_executor",
    "resolve",
]
