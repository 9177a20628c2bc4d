"""Split decoding: each training batch decoded partly by the CPU workers, partly by the GPU.

GPU decoding alone leaves most host cores idle (one H200 trains faster than nvImageCodec delivers
beside the step), and CPU decoding alone needs more cores than a GPU host has.
``decoders.HybridDecoder`` (``--decoder hybrid``) uses both at once on every batch:

1. Host, per record (grain ``random_map``, ``SplitPlan``): a record whose row in its process's
   batch is below ``cpu_rows`` is decoded and augmented on the CPU exactly as the ``cpu`` decoder
   does (``TrainPreprocess``; in the grain worker processes, so give the loader workers: with
   none it runs in the training process, beside the GPU decoder); the others get the ``gpu``
   decoder's crop plan (``CropPlan``). Both draw from the record's own generator, so each row is
   the row the ``cpu`` or ``gpu`` decoder would give for that record.
2. Host, per batch (``collate_split``): {"image": uint8 (cpu_rows, S, S, C), "label": int32 (B,),
   and the plan rows collated as ``collate_plans`` does ("jpeg", "offsets", "box", "flip")}.
3. GPU (``SplitBatchDecoder``): the plan rows decoded by ``GpuJpegDecoder``, put after the CPU
   rows: {"image": uint8 (B, S, S, C), "label": int32 (B,)} device arrays.

Which rows the CPU decodes depends only on the row's position in the process batch, so batches
are deterministic and resume exactly. The two decoders differ slightly (0.5 uint8 levels on
average): a run gives the same pixels for the same ``cpu_rows``, batch size and process count.
"""

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flax_attention.data.gpu_decode import CropPlan, collate_plans
from flax_attention.data.preprocess import TrainPreprocess

PLAN_KEYS = ("jpeg", "offsets", "box", "flip")


def cpu_rows_of(batch_size: int, cpu_share: float) -> int:
    """Rows of each process batch the CPU decodes: ``round(cpu_share * batch_size)``, at least
    one and at most ``batch_size - 1`` (both decoders get rows); a ``ValueError`` for a share
    outside (0, 1) or a batch of one row."""
    if not 0.0 < cpu_share < 1.0:
        raise ValueError(f"cpu_share must be in (0, 1) for hybrid decoding, got {cpu_share}")
    if batch_size < 2:
        raise ValueError(f"hybrid decoding needs at least 2 rows per batch, got {batch_size}")
    return min(batch_size - 1, max(1, round(cpu_share * batch_size)))


def with_index(index: int, record: dict) -> tuple[int, dict]:
    """grain ``map_with_index`` callable: the record with its index in the training stream."""
    return index, record


@dataclasses.dataclass(frozen=True)
class SplitPlan:
    """grain ``random_map`` callable on ``(stream index, record)``: the CPU decoder's output for
    a record in the first ``cpu_rows`` rows of its process batch (``index % batch_size``: every
    global batch is a whole number of process batches), the GPU decoder's crop plan otherwise."""

    preprocess: TrainPreprocess
    batch_size: int
    cpu_rows: int

    def __call__(self, element: tuple[int, dict], rng: np.random.Generator) -> dict:
        index, record = element
        if index % self.batch_size < self.cpu_rows:
            return self.preprocess(record, rng)
        return CropPlan()(record, rng)


def collate_split(rows: Sequence[dict]) -> dict[str, np.ndarray]:
    """grain ``batch_fn``: B rows, the CPU-decoded ones first -> {"image": uint8 (k, S, S, C),
    "label": int32 (B,), "jpeg", "offsets", "box", "flip" of the B - k plans}."""
    decoded = [row for row in rows if "image" in row]
    plans = rows[len(decoded) :]
    if any("jpeg" not in row for row in plans):
        raise ValueError("collate_split: the CPU-decoded rows must come first in the batch")
    return {
        "image": np.stack([row["image"] for row in decoded]),
        "label": np.stack([row["label"] for row in rows]),
        **{k: v for k, v in collate_plans(plans).items() if k != "label"},
    }


class SplitBatchDecoder:
    """A collated split batch -> {"image": uint8 (B, S, S, C), "label": int32 (B,)} device arrays:
    the plan rows decoded by ``decode_plans`` (a ``GpuJpegDecoder``), after the CPU rows.
    Thread-safe when ``decode_plans`` is."""

    def __init__(self, decode_plans: Callable[[dict[str, np.ndarray]], dict[str, jax.Array]]):
        self.decode_plans = decode_plans

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        cpu_images = batch["image"]
        plans = {key: batch[key] for key in PLAN_KEYS}
        plans["label"] = batch["label"][len(cpu_images) :]
        gpu_images = self.decode_plans(plans)["image"]
        images = jnp.concatenate([jnp.asarray(cpu_images), gpu_images], axis=0)
        return {"image": images, "label": jnp.asarray(batch["label"])}
