"""grain input pipeline over a registered tfds dataset: shard, shuffle, preprocess, batch.

Order: source -> (train) per-epoch shuffle + repeat -> augment -> this process's shard ->
batch. Everything up to batching is a random-access ``grain.MapDataset``, so the position in the
stream is a single number, the batches consumed: ``make_loader(..., start=k)`` continues from
there with any number of workers (the training loop checkpoints that number).

Typical training loop::

    it = make_loader("digits", train=True, batch_size=128, seed=0)
    batch = next(it)              # {"image": uint8 (128, 16, 16, 1) NHWC, "label": int32 (128,)}
    ...                           # k batches later, store k with the model checkpoint
    it = make_loader("digits", train=True, batch_size=128, seed=0, start=k)  # the same batches
"""

import functools
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax
import numpy as np

from flax_attention.data.decoders import CPU_DECODER, Decoder
from flax_attention.data.preprocess import EvalPreprocess, TrainPreprocess
from flax_attention.data.registry import get_spec
from flax_attention.data.sources import data_source
from flax_attention.data.workers import exit_with_parent

if TYPE_CHECKING:
    import grain


def make_dataset(
    name: str,
    *,
    train: bool,
    batch_size: int,
    data_dir: str | Path | None = None,
    split: str | None = None,
    image_size: int | None = None,
    seed: int = 0,
    num_epochs: int | None = None,
    shard_index: int | None = None,
    shard_count: int | None = None,
    decoder: Decoder = CPU_DECODER,
    devices: int = 1,
) -> "grain.MapDataset":
    """Batched random-access dataset of {"image": uint8 (B, S, S, C) NHWC, "label": int32 (B,)}.

    Images stay uint8 (normalise them on the device: ``device.normalize_images`` with the
    spec's mean/std; the training steps do).

    train=True: the spec's train split, reshuffled every epoch (seeded), augmented, repeated
    ``num_epochs`` times (None: forever), incomplete last batch dropped. train=False: the eval
    split once, in order, deterministic preprocessing, last batch kept (may be smaller).
    ``split`` overrides the split (tfds syntax), ``image_size`` the spec's S. The data is
    sharded over ``shard_count`` processes (default ``jax.process_count()``), this process
    reading shard ``shard_index`` (default ``jax.process_index()``). In training every process
    reads one shuffled, augmented stream and takes its contiguous block of each global batch
    (``_ProcessRows``), so the global batch, row for row, is the same whatever the number of
    processes: each device normalises and differentiates the same rows as in a one-process run
    on the same devices. Evaluation shards element-wise.

    ``decoder`` makes the training batches (``decoders``): ``CpuDecoder`` the pixels above,
    ``GpuDecoder`` the JPEG bytes and the drawn crops instead (training split of a JPEG
    dataset), ``HybridDecoder`` pixels for the first rows of each device's block of the batch
    and crops for the others; the decoder's ``input_to_device`` finishes them on the device.
    ``devices``: how many of this process's devices hold its training batch, each a contiguous
    block of ``batch_size / devices`` rows (those of the sharding ``input_to_device`` decodes
    for; 1 for a sharding of None). In evaluation the decoder's ``plan_eval`` makes the
    batches: pixels (``CpuDecoder``) or centre-crop plans.
    """
    import grain

    spec = get_spec(name)
    size = image_size or spec.image_size
    split = split or (spec.train_split if train else spec.eval_split)
    shard_index = jax.process_index() if shard_index is None else shard_index
    shard_count = jax.process_count() if shard_count is None else shard_count
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index={shard_index} not in [0, shard_count={shard_count})")

    ds = grain.MapDataset.source(data_source(name, split, data_dir))
    if train:
        # One endless stream for every process: shuffled with a new permutation per epoch,
        # augmented with an rng that depends on (seed, index in the stream). Global batch i
        # holds stream elements [i * B, (i + 1) * B), B = shard_count * batch_size, and process
        # p its rows [p * batch_size, (p + 1) * batch_size).
        # (The seed is the one-process seed of the earlier per-shard streams.)
        augment_seed = int(np.random.SeedSequence([seed, 0]).generate_state(1)[0])
        ds = ds.shuffle(seed=seed).repeat(num_epochs)
        transform = TrainPreprocess(spec.train_transform, size, spec.channels)
        ds = decoder.plan(ds, transform, batch_size, augment_seed, devices)
        ds = _process_rows(ds, batch_size, shard_index, shard_count)
        return decoder.batch(ds, batch_size)
    transform = EvalPreprocess(spec.eval_transform, size, spec.channels)
    return decoder.plan_eval(ds[shard_index::shard_count], transform, batch_size)


class _ProcessRows:
    """Element j of a process's training stream -> the element of the global stream it is:
    row j % b of its block [offset, offset + b) of global batch j // b (b = batch_size, global
    batches of b * shard_count elements)."""

    def __init__(self, stream: Any, batch_size: int, shard_index: int, shard_count: int):
        self.stream = stream
        self.batch_size = batch_size
        self.global_batch = batch_size * shard_count
        self.offset = batch_size * shard_index

    def __call__(self, j: int) -> Any:
        batch, row = divmod(int(j), self.batch_size)
        return self.stream[batch * self.global_batch + self.offset + row]


def _process_rows(
    stream: "grain.MapDataset", batch_size: int, shard_index: int, shard_count: int
) -> "grain.MapDataset":
    """This process's rows of every global batch of `stream` (see `_ProcessRows`), in order."""
    import grain

    if shard_count == 1:
        return stream
    rows = len(stream) // (batch_size * shard_count) * batch_size
    return grain.MapDataset.range(rows).map(
        _ProcessRows(stream, batch_size, shard_index, shard_count)
    )


def make_loader(
    name: str,
    *,
    train: bool,
    batch_size: int,
    data_dir: str | Path | None = None,
    split: str | None = None,
    image_size: int | None = None,
    seed: int = 0,
    num_epochs: int | None = None,
    shard_index: int | None = None,
    shard_count: int | None = None,
    num_workers: int = 0,
    num_threads: int = 4,
    decoder: Decoder = CPU_DECODER,
    devices: int = 1,
    start: int = 0,
) -> "grain.DatasetIterator":
    """Iterator over the batches of ``make_dataset(...)`` (same arguments, same batches), from
    batch ``start`` on: a run that consumed k batches continues with ``start=k``, whatever the
    number of workers of either run.

    ``num_workers`` > 0 preprocesses in that many worker processes (grain ``mp_prefetch``),
    0 in this process with ``num_threads`` reader threads. (grain's own ``get_state()`` /
    ``set_state()`` work too, between loaders with the same arguments and workers.) With
    workers, call ``close()`` on the iterator when done so that its processes are stopped;
    they also exit by themselves when this process dies. Their batches arrive in shared memory
    and are copied out of it at once, so no shared memory outlives the batch being read.
    """
    import grain

    if start < 0:
        raise ValueError(f"start must be >= 0, got {start}")
    ds = make_dataset(
        name,
        train=train,
        batch_size=batch_size,
        data_dir=data_dir,
        split=split,
        image_size=image_size,
        seed=seed,
        num_epochs=num_epochs,
        shard_index=shard_index,
        shard_count=shard_count,
        decoder=decoder,
        devices=devices,
    )
    if start:
        ds = ds[start:]
    ids = ds.to_iter_dataset(
        grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=num_threads)
    )
    if num_workers > 0:
        _mark_absl_flags_parsed()
        ids = ids.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=num_workers),
            worker_init_fn=functools.partial(exit_with_parent, os.getpid()),
        ).map(_out_of_shared_memory)
    return iter(ids)


def _out_of_shared_memory(batch: Any) -> Any:
    """``batch`` with every array a private copy: the shared memory a worker sent it in is
    released as soon as grain's array is dropped, not whenever the caller drops the batch."""
    return jax.tree.map(_private_copy, batch)


def _private_copy(leaf: Any) -> Any:
    """A plain ndarray copy of a shared-memory array (an ndarray subclass); others as they are."""
    if isinstance(leaf, np.ndarray) and type(leaf) is not np.ndarray:
        return np.array(leaf)
    return leaf


def _mark_absl_flags_parsed() -> None:
    """grain 0.2.18 reads an absl flag when starting workers and fails in programs that never
    parsed absl flags (google/grain#1355); marking them parsed keeps every flag at its default."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
