"""Evaluation over a whole split: every process its shard, padded to the same number of steps."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
from tqdm import tqdm

from flax_attention import data

HOST_DECODER = data.CpuDecoder()  # evaluation batches decoded in the loader


def evaluate(
    eval_fn: Callable[[Any, dict[str, np.ndarray]], dict[str, Any]],
    state: Any,
    dataset: str,
    *,
    local_batch: int,
    data_dir: str | Path | None = None,
    image_size: int | None = None,
    split: str | None = None,
    progress: bool = True,
    decoder: data.Decoder = HOST_DECODER,
    sharding: Any = None,
) -> dict[str, float]:
    """{"eval_loss", "eval_top1", "eval_top5"} over ``split`` (default: the evaluation split)
    of ``dataset``.

    ``eval_fn(state, batch)`` returns the sums of `steps.eval_step` over a batch of
    ``local_batch`` rows ({"image": uint8 NHWC, "label", "mask"}). Every process reads its
    shard; shards shorter than the longest (an empty one too) are padded with masked rows, so
    all processes run the same number of steps with one compiled shape. ``decoder`` decodes
    the batches: on the host (``CpuDecoder``), or centre-crop plans on each device of
    ``sharding`` (GPU decoders; None: the first local device), its "image" then a device array.
    """
    spec = data.get_spec(dataset)
    split = split or spec.eval_split
    size = len(data.data_source(dataset, split, data_dir))
    num_batches = math.ceil(math.ceil(size / jax.process_count()) / local_batch)
    ds = data.make_dataset(
        dataset,
        train=False,
        batch_size=local_batch,
        data_dir=data_dir,
        split=split,
        image_size=image_size,
        decoder=decoder,
    )
    finish = eval_batch_finisher(decoder, spec, image_size, local_batch, sharding)
    totals: dict[str, float] = {}
    for i in tqdm(range(num_batches), desc="evaluate", leave=False, disable=not progress):
        batch = finish(ds[i] if i < len(ds) else None)
        sums = jax.device_get(eval_fn(state, batch))
        for k, v in sums.items():
            totals[k] = totals.get(k, 0.0) + float(v)
    count = max(totals.pop("count"), 1.0)
    return {f"eval_{k}": v / count for k, v in totals.items()}


def eval_batch_finisher(
    decoder: data.Decoder,
    spec: data.DatasetSpec,
    image_size: int | None,
    rows: int,
    sharding: Any = None,
) -> Callable[[dict | None], dict[str, Any]]:
    """A loader's evaluation batch (or None past the end of the shard) -> the batch `eval_step`
    takes: padded to `rows` rows with a "mask" (host pixels with `pad_batch`, centre-crop
    plans with `data.pad_plans`), then decoded by `decoder` (on each device of `sharding` for a
    GPU decoder)."""
    like = batch_template(spec, image_size)
    pad = data.pad_plans if decoder.eval_on_device else pad_batch
    finish = decoder.input_to_device(lambda batch: batch, image_size or spec.image_size, sharding)
    return lambda batch: finish(pad(batch, rows, like))


def batch_template(spec: data.DatasetSpec, image_size: int | None) -> dict[str, np.ndarray]:
    """Zero rows with the keys, dtypes and row shapes of the evaluation batches of `spec`'s
    dataset at `image_size` (default: the dataset's): the layout of every padded batch."""
    size = image_size or spec.image_size
    return {
        "image": np.zeros((0, size, size, spec.channels), np.uint8),
        "label": np.zeros((0,), np.int32),
    }


def pad_batch(batch: dict | None, rows: int, like: dict) -> dict[str, np.ndarray]:
    """``batch`` (or nothing) padded to ``rows`` rows with zeros, keys and dtypes as in ``like``,
    plus a float32 "mask" (rows,): one compiled shape for every batch of a split."""
    n = 0 if batch is None else len(batch["label"])
    if batch is not None and batch.keys() != like.keys():
        raise ValueError(f"batch keys {sorted(batch)} differ from the template's {sorted(like)}")
    out = {}
    for key, ref in like.items():
        value = np.zeros((rows, *ref.shape[1:]), ref.dtype)
        if batch is not None:
            value[:n] = batch[key]
        out[key] = value
    out["mask"] = (np.arange(rows) < n).astype(np.float32)
    return out
