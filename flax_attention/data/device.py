"""The accelerator's side of the input: normalisation inside the jitted step, device prefetch.

Batches cross to the device as uint8 (a quarter of float32's bytes) and are normalised there, in
the step, with the dataset's mean/std: ``(x / 255 - mean) / std`` in float32, the same formula
the host used to apply. ``prefetch_to_device`` keeps the next batches' host-to-device copies in
flight while the current step runs.
"""

import collections
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp


def normalize_images(
    images: jax.Array,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
    dtype: Any = jnp.float32,
) -> jax.Array:
    """uint8 (..., C) in [0, 255] -> ``dtype`` ``(x / 255 - mean) / std`` per channel, computed
    in float32 (mean/std None: the 0..255 values as ``dtype``). Floating-point input is returned
    unchanged (already normalised)."""
    if jnp.issubdtype(images.dtype, jnp.floating):
        return images
    if mean is None or std is None:
        return images.astype(dtype)
    scaled = images.astype(jnp.float32) / 255.0
    mean = jnp.asarray(mean, jnp.float32)
    std = jnp.asarray(std, jnp.float32)
    return ((scaled - mean) / std).astype(dtype)


def prefetch_to_device(
    batches: Iterator[Any], put: Callable[[Any], Any], size: int = 2
) -> Iterator[tuple[Any, Any]]:
    """Yield ``put(batch)`` for each item of ``batches``, ``size`` batches ahead of the consumer.

    ``put`` starts the host-to-device copy and returns at once (JAX transfers asynchronously),
    so while the consumer runs step n the copies of n+1..n+size are under way. Items of
    ``batches`` are ``(host_batch, tag)`` pairs and the tag is yielded with its device batch, so
    that e.g. the loader position *after that batch* stays attached to it (what a checkpoint
    taken after the step must record).
    """
    if size < 1:
        raise ValueError(f"prefetch size must be >= 1, got {size}")
    queue: collections.deque = collections.deque()

    def enqueue(count: int) -> None:
        for host_batch, tag in batches:
            queue.append((put(host_batch), tag))
            if len(queue) >= count:
                return

    while True:
        enqueue(size)
        if not queue:
            return
        yield queue.popleft()
