"""Split decoding: each training batch decoded partly by the CPU workers, partly by the GPU.

GPU decoding alone leaves most host cores idle (one H200 trains faster than nvImageCodec delivers
beside the step), and CPU decoding alone needs more cores than a GPU host has.
``decoders.HybridDecoder`` (``--decoder hybrid``) uses both at once on every batch:

1. Host, per record (grain ``random_map``, ``SplitPlan``): a record whose row in its process's
   batch is below ``cpu_rows`` is decoded and augmented on the CPU exactly as the ``cpu`` decoder
   does (``TrainPreprocess``; in the grain worker processes, so give the loader workers: with
   none it runs in the training process, beside the GPU decoder); the others get the ``gpu``
   decoder's crop plan (``plans.CropPlan``). Both draw from the record's own generator, so each
   row is the row the ``cpu`` or ``gpu`` decoder would give for that record.
2. Host, per batch (``plans.collate_plans``): the CPU rows are pixel rows of the plan batch.
3. GPU (``per_device.PerDeviceDecoder``): each device decodes its plan rows and copies its pixel
   rows into its canvas; a pixel row comes out exactly as the CPU decoded it.

Which rows the CPU decodes depends only on the row's position in the process batch, so batches
are deterministic and resume exactly. The two decoders differ slightly (0.5 uint8 levels on
average): a run gives the same pixels for the same ``cpu_rows``, batch size and process count.
"""

import dataclasses

import numpy as np

from flax_attention.data.plans import CropPlan
from flax_attention.data.preprocess import TrainPreprocess


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
        return CropPlan(self.preprocess)(record, rng)
