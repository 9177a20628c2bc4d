"""Weight initialisers sampled on the host with numpy, seeded by the JAX key they are given.

`jax.random` compiles its samplers once per parameter shape: building `cbam_resnet50` eagerly
compiled 78 XLA programs, 10-20 s on a 2-core CPU (one program for the whole constructor, under
`nnx.jit`, took as long to compile). These initialisers draw the same distributions as Flax's
with numpy (no compilation): `he_normal_fan_out` is
`nnx.initializers.variance_scaling(2.0, "fan_out", "normal")` (torchvision's and timm's
`kaiming_normal_(mode="fan_out")` for convolutions), `lecun_normal` is
`nnx.initializers.lecun_normal()` (`nnx.Linear`'s default: a normal truncated at two standard
deviations, rescaled to variance 1 / fan_in). The values differ from `jax.random`'s; they are a
deterministic function of the key (`jax.random.key_data`) and the shape. Under a trace (`jit`,
`eval_shape`, `vmap`) the same numpy sampler runs through `jax.pure_callback`, so a model built
under `nnx.jit` equals the one built eagerly from the same key, and `eval_shape` samples nothing.

Kernel layouts as in Flax: the last axis is the output features, the one before it the input
features, the others the receptive field (HWIO for convolutions, (in, out) for dense layers).
"""

from __future__ import annotations

from collections.abc import Callable
from math import prod

import jax
import jax.numpy as jnp
import numpy as np

Shape = tuple[int, ...]

# Standard deviation of a standard normal truncated to [-2, 2] (Flax's truncated_normal rescale).
TRUNCATED_STD = 0.87962566103423978


def fans(shape: Shape) -> tuple[int, int]:
    """(fan_in, fan_out) of a kernel: in/out features times the receptive field size."""
    if len(shape) < 2:
        raise ValueError(f"a kernel needs at least 2 axes (..., in, out); got shape {shape}")
    receptive = prod(shape[:-2])
    return shape[-2] * receptive, shape[-1] * receptive


def _generator(key_data: np.ndarray) -> np.random.Generator:
    return np.random.default_rng(np.asarray(key_data, np.uint32))


def _sample_dtype(dtype: jnp.dtype) -> type:
    return np.float64 if jnp.dtype(dtype).itemsize > 4 else np.float32


def _host_initializer(
    sample: Callable[[np.random.Generator, Shape, type], np.ndarray],
) -> Callable[[jax.Array, Shape, jnp.dtype], jax.Array]:
    """An `init(key, shape, dtype)` that runs `sample(generator, shape, np_dtype)` on the host."""

    def init(key: jax.Array, shape: Shape, dtype: jnp.dtype = jnp.float32) -> jax.Array:
        shape = tuple(int(d) for d in shape)
        np_dtype = _sample_dtype(dtype)
        data = jax.random.key_data(key)
        if isinstance(data, jax.core.Tracer):
            result = jax.ShapeDtypeStruct(shape, np_dtype)
            values = jax.pure_callback(
                lambda d: sample(_generator(d), shape, np_dtype),
                result,
                data,
                vmap_method="sequential",
            )
            return values.astype(dtype)
        return jnp.asarray(sample(_generator(np.asarray(data)), shape, np_dtype), dtype)

    init.__doc__ = sample.__doc__
    return init


def _he_normal_fan_out(rng: np.random.Generator, shape: Shape, dtype: type) -> np.ndarray:
    """N(0, 2 / fan_out) (He/Kaiming normal over fan-out, no truncation)."""
    values = rng.standard_normal(shape, dtype=dtype)
    values *= dtype(np.sqrt(2.0 / fans(shape)[1]))
    return values


def _lecun_normal(rng: np.random.Generator, shape: Shape, dtype: type) -> np.ndarray:
    """Normal truncated to two standard deviations, scaled to variance 1 / fan_in."""
    values = rng.standard_normal(shape, dtype=dtype)
    outside = np.abs(values) > 2
    while outside.any():  # rejection: redraw the ~4.6% outside [-2, 2] until none is
        values[outside] = rng.standard_normal(int(outside.sum()), dtype=dtype)
        outside = np.abs(values) > 2
    values *= dtype(np.sqrt(1.0 / fans(shape)[0]) / TRUNCATED_STD)
    return values


he_normal_fan_out = _host_initializer(_he_normal_fan_out)
lecun_normal = _host_initializer(_lecun_normal)
