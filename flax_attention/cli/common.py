"""What the `flax-attention` commands share: the argument parser, the usage error and a compiled
forward pass."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from functools import partial
from typing import NoReturn

import jax
from flax import nnx


class Parser(argparse.ArgumentParser):
    """Usage errors as one `error: ...` line on stderr, exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


class UsageError(Exception):
    """A command-line argument the command cannot use; exit status 2."""


def jitted_forward(model: nnx.Module) -> Callable[[jax.Array], jax.Array]:
    """`model(x)` compiled once, for NHWC batches (the model in its current mode)."""
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
    return partial(forward, state)
