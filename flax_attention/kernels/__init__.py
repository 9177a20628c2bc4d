"""Hand-written kernels, each with its custom VJP, kept only where they measure faster than XLA
in the network: `max_pool` (ResNet's stem max pool with a scatter-free backward).

`PALLAS_KERNELS` lists every function of this package that calls `pl.pallas_call`, each with
example arguments, so that a test compiles each for TPU (Mosaic) on any host with libtpu; a
module of this package that calls `pallas_call` without an entry here fails that test.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple


class PallasKernel(NamedTuple):
    """A Pallas kernel's entry point: `fn(*example_args())`, where `example_args` returns
    `jax.ShapeDtypeStruct`s (no sharding: the test places them on one TPU chip)."""

    name: str
    fn: Callable[..., Any]
    example_args: Callable[[], tuple[Any, ...]]


PALLAS_KERNELS: tuple[PallasKernel, ...] = ()
