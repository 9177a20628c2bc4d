"""The accelerator's side of the input: normalisation inside the jitted step, device prefetch.

Batches cross to the device as uint8 (a quarter of float32's bytes) and are normalised there, in
the step, with the dataset's mean/std: ``(x / 255 - mean) / std`` in float32, the same formula
the host used to apply. ``prefetch_to_device`` prepares the next batches (host-to-device copies,
or GPU decoding) in a background thread while the current step runs.
"""

import queue
import threading
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
    batches: Iterator[tuple[Any, Any]], put: Callable[[Any], Any], size: int = 2
) -> Iterator[tuple[Any, Any]]:
    """Yield ``(put(batch), tag)`` for each ``(batch, tag)`` of ``batches``, in order, prepared
    up to ``size`` batches ahead by a background thread.

    The thread draws host batches (with ``num_workers=0`` that is where the decoding happens)
    and runs ``put`` (a host-to-device copy, or GPU decoding), so the caller's thread only
    dispatches steps: the device never waits on input when the host keeps up. The tag stays
    attached to its batch, e.g. the loader position *after that batch*, which is what a
    checkpoint taken after the step must record. An exception in the thread is raised here,
    after the batches before it; closing the generator stops the thread.
    """
    if size < 1:
        raise ValueError(f"prefetch size must be >= 1, got {size}")
    ready: queue.Queue = queue.Queue(maxsize=size)
    stop = threading.Event()

    def offer(item: tuple) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for host_batch, tag in batches:
                if not offer((_BATCH, put(host_batch), tag)):
                    return
            offer((_END, None, None))
        except BaseException as error:  # Re-raised in the consumer's thread.
            offer((_ERROR, error, None))

    thread = threading.Thread(target=produce, name="prefetch_to_device", daemon=True)
    thread.start()
    try:
        while True:
            kind, value, tag = ready.get()
            if kind is _END:
                return
            if kind is _ERROR:
                raise value
            yield value, tag
    finally:
        stop.set()
        thread.join()


_BATCH, _END, _ERROR = object(), object(), object()
