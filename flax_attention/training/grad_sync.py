"""Gradient averaging issued during the backward pass, one collective per parameter.

`mean_in_backward(params, axis_name)` is the identity on every leaf; its VJP averages the
leaf's cotangent over `axis_name` (`lax.pmean`). Differentiating a loss through it gives
gradients already averaged over the replicas, and each parameter's all-reduce can start as soon
as that parameter's gradient is computed (the last layers' first) instead of one reduction of
every gradient after the whole backward.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax

AxisName = str | tuple[str, ...]


def mean_in_backward(tree: Any, axis_name: AxisName) -> Any:
    """`tree` unchanged; the gradient of each leaf is `lax.pmean`-ed over `axis_name`."""
    return jax.tree.map(lambda leaf: _mean_cotangent(leaf, axis_name), tree)


@partial(jax.custom_vjp, nondiff_argnums=(1,))
def _mean_cotangent(x: jax.Array, axis_name: AxisName) -> jax.Array:
    return x


def _forward(x: jax.Array, axis_name: AxisName) -> tuple[jax.Array, None]:
    return x, None


def _backward(axis_name: AxisName, _: None, cotangent: jax.Array) -> tuple[jax.Array]:
    return (jax.lax.pmean(cotangent, axis_name),)


_mean_cotangent.defvjp(_forward, _backward)
