"""Hand-written kernels, each with its custom VJP, kept only where they measure faster than XLA
in the network: `max_pool` (ResNet's stem max pool with a scatter-free backward) and
`spatial_gate` (CBAM's spatial gate after its pools, Pallas; its "fused" formulation).

`PALLAS_KERNELS` lists every function of this package that calls `pl.pallas_call`, each with
example arguments and the platform it lowers for: a test compiles each "tpu" entry for TPU
(Mosaic) on any host with libtpu and lowers each "cuda" entry (Triton) for CUDA on any host; a
module of this package that calls `pallas_call` without an entry here fails those tests.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from flax_attention.kernels import spatial_gate


class PallasKernel(NamedTuple):
    """A Pallas kernel's entry point: `fn(*example_args())`, where `example_args` returns
    `jax.ShapeDtypeStruct`s (no sharding: the test places them on one chip), and the platform
    its lowering targets ("tpu": Mosaic TPU; "cuda": Triton)."""

    name: str
    fn: Callable[..., Any]
    example_args: Callable[[], tuple[Any, ...]]
    platform: str = "tpu"


def _spatial_gate_args() -> tuple[jax.ShapeDtypeStruct, ...]:
    """CBAM's spatial gate at ResNet-50's last stage (batch 128, 7x7, k = 7) and a gate
    cotangent."""
    f32 = jnp.float32
    return (
        jax.ShapeDtypeStruct((128, 7, 7, 2), f32),
        jax.ShapeDtypeStruct((7, 7, 2, 1), f32),
        jax.ShapeDtypeStruct((1,), f32),
        jax.ShapeDtypeStruct((1,), f32),
        jax.ShapeDtypeStruct((128, 7, 7), f32),
    )


PALLAS_KERNELS: tuple[PallasKernel, ...] = (
    PallasKernel(
        "spatial_gate forward and backward",
        spatial_gate.forward_and_backward,
        _spatial_gate_args,
        "cuda",
    ),
)
