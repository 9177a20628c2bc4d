"""Synthetic device-resident batches for benchmarks: pure jax, no grain or tfds."""

import itertools
from collections.abc import Iterator

import jax
import jax.numpy as jnp
from jax.typing import DTypeLike


def synthetic_batches(
    batch_size: int,
    image_size: int,
    num_classes: int,
    *,
    seed: int = 0,
    dtype: DTypeLike = jnp.float32,
    channels: int = 3,
) -> Iterator[dict[str, jax.Array]]:
    """Endless batches shaped like ``make_loader``'s, already on the default device:
    {"image": standard-normal ``dtype`` NHWC (batch_size, image_size, image_size, channels),
    "label": int32 (batch_size,) uniform in [0, num_classes)}.

    The one random batch is generated once and yielded every step, so data never limits a
    benchmark; ``next(synthetic_batches(...))`` gives a single batch.
    """
    image_key, label_key = jax.random.split(jax.random.key(seed))
    shape = (batch_size, image_size, image_size, channels)
    batch = {
        "image": jax.random.normal(image_key, shape, dtype),
        "label": jax.random.randint(label_key, (batch_size,), 0, num_classes, jnp.int32),
    }
    return itertools.repeat(batch)
