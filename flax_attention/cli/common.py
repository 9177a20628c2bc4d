"""What the `flax-attention` commands share: the usage error and a compiled forward pass."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import jax
from flax import nnx


class UsageError(Exception):
    """A command-line argument the command cannot use; exit status 2."""


def jitted_forward(model: nnx.Module) -> Callable[[jax.Array], jax.Array]:
    """`model(x)` compiled once, for NHWC batches (the model in its current mode)."""
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
    return partial(forward, state)
