"""The accelerator's side of the input: normalisation inside the jitted step, device prefetch.

Batches cross to the device as uint8 (a quarter of float32's bytes) and are normalised there, in
the step, with the dataset's mean/std: ``(x / 255 - mean) / std`` in float32, the same formula
the host used to apply. ``prefetch_to_device`` prepares the next batches (host-to-device copies,
or GPU decoding) in background threads while the current step runs.
"""

import queue
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jax
import jax.numpy as jnp

STOP_TIMEOUT_S = 10.0  # how long closing waits for the prefetch thread (blocked in a loader)


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
    batches: Iterator[tuple[Any, Any]],
    put: Callable[[Any], Any],
    size: int = 2,
    threads: int = 1,
) -> Iterator[tuple[Any, Any]]:
    """Yield ``(put(batch), tag)`` for each ``(batch, tag)`` of ``batches``, in order, prepared
    up to ``size`` batches ahead in the background.

    A background thread draws host batches (with ``num_workers=0`` that is where the decoding
    happens) and runs ``put`` (a host-to-device copy, or GPU decoding), so the caller's thread
    only dispatches steps: the device never waits on input when the host keeps up. With
    ``threads > 1``, ``put`` runs on that many threads at once, on consecutive batches (it must
    then be thread-safe); the order of the batches is kept. The tag stays attached to its batch,
    e.g. the loader position *after that batch*, which is what a checkpoint taken after the step
    must record. An exception in ``put`` or in ``batches`` is raised here, after the batches
    before it; closing the generator stops the threads, waiting at most ``STOP_TIMEOUT_S`` for
    the one drawing batches: one blocked in ``batches`` is reported on stderr and left behind
    (a daemon thread).
    """
    if size < 1:
        raise ValueError(f"prefetch size must be >= 1, got {size}")
    if threads < 1:
        raise ValueError(f"prefetch threads must be >= 1, got {threads}")
    ready: queue.Queue = queue.Queue(maxsize=max(size, threads))
    stop = threading.Event()
    pool = ThreadPoolExecutor(threads, thread_name_prefix="prefetch_put") if threads > 1 else None

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
                value = put(host_batch) if pool is None else pool.submit(put, host_batch)
                if not offer((_BATCH, value, tag)):
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
            yield (value if pool is None else value.result()), tag
    finally:
        stop.set()
        thread.join(timeout=STOP_TIMEOUT_S)
        if thread.is_alive():
            print(
                f"warning: the input thread did not stop within {STOP_TIMEOUT_S:g} s (its data "
                "loader is blocked); leaving it behind",
                file=sys.stderr,
            )
        if pool is not None:
            pool.shutdown(cancel_futures=True)


_BATCH, _END, _ERROR = object(), object(), object()
