"""Split decoding: each training batch decoded partly by the CPU workers, partly by the GPU.

GPU decoding alone leaves most host cores idle (one H200 trains faster than nvImageCodec delivers
beside the step), and CPU decoding alone needs more cores than a GPU host has.
``decoders.HybridDecoder`` (``--decoder hybrid``) uses both at once on every batch:

1. Host, per record (grain ``random_map``, ``SplitPlan``): a process batch of b rows is split
   over the process's n devices in contiguous blocks of b / n rows (``per_device.device_rows``);
   a record whose row in its block is below ``cpu_rows`` (``cpu_rows_of(b / n, cpu_share)``) is
   decoded and augmented on the CPU exactly as the ``cpu`` decoder does (``TrainPreprocess``; in
   the grain worker processes, so give the loader workers: with none it runs in the training
   process, beside the GPU decoder); the others get the ``gpu`` decoder's crop plan
   (``plans.CropPlan``). Both draw from the record's own generator, so each row is the row the
   ``cpu`` or ``gpu`` decoder would give for that record.
2. Host, per batch (``plans.collate_plans``): the CPU rows are pixel rows of the plan batch.
3. GPU (``per_device.PerDeviceDecoder``): each device decodes its plan rows and copies its pixel
   rows into its output batch; a pixel row comes out exactly as the CPU decoded it. Every device gets
   the same number of CPU rows, so the devices' decoding work is even.

Which rows the CPU decodes depends only on the row's position in the process batch, the batch
size, the process's device count and ``cpu_share`` (with one device: the first ``cpu_rows``
rows), so batches are deterministic and resume exactly. The two decoders differ slightly (0.5
uint8 levels on average): a run gives the same pixels for the same ``cpu_share``, batch size,
process count and device count per process.
"""

import dataclasses

import numpy as np

from flax_attention.data.plans import CropPlan
from flax_attention.data.preprocess import TrainPreprocess


def cpu_rows_of(rows: int, cpu_share: float) -> int:
    """Rows of each device's block of ``rows`` rows the CPU decodes: ``round(cpu_share *
    rows)``, at least one and at most ``rows - 1`` (both decoders get rows); a ``ValueError``
    for a share outside (0, 1) or a block of one row."""
    if not 0.0 < cpu_share < 1.0:
        raise ValueError(f"cpu_share must be in (0, 1) for hybrid decoding, got {cpu_share}")
    if rows < 2:
        raise ValueError(f"hybrid decoding needs at least 2 rows per device in a batch, got {rows}")
    return min(rows - 1, max(1, round(cpu_share * rows)))


def block_rows_of(batch_size: int, devices: int) -> int:
    """Rows of each device's block of a process batch of ``batch_size`` rows held by
    ``devices`` devices; a ``ValueError`` when the rows do not split evenly over them."""
    if devices < 1 or batch_size % devices:
        raise ValueError(f"{batch_size} rows do not split evenly over {devices} devices")
    return batch_size // devices


def with_index(index: int, record: dict) -> tuple[int, dict]:
    """grain ``map_with_index`` callable: the record with its index in the training stream."""
    return index, record


@dataclasses.dataclass(frozen=True)
class SplitPlan:
    """grain ``random_map`` callable on ``(stream index, record)``: the CPU decoder's output for
    a record in the first ``cpu_rows`` rows of its device's block of ``block_rows`` rows
    (``index % block_rows``: every global batch is a whole number of process batches, every
    process batch a whole number of blocks), the GPU decoder's crop plan otherwise."""

    preprocess: TrainPreprocess
    block_rows: int
    cpu_rows: int

    @classmethod
    def spread(
        cls, preprocess: TrainPreprocess, batch_size: int, devices: int, cpu_share: float
    ) -> "SplitPlan":
        """The split of process batches of ``batch_size`` rows held by ``devices`` devices
        (contiguous blocks of ``batch_size / devices`` rows), ``cpu_rows_of(block, cpu_share)``
        CPU rows at the start of each block; a ``ValueError`` when the rows do not split
        evenly over the devices or a block is one row."""
        block_rows = block_rows_of(batch_size, devices)
        return cls(preprocess, block_rows, cpu_rows_of(block_rows, cpu_share))

    def __call__(self, element: tuple[int, dict], rng: np.random.Generator) -> dict:
        index, record = element
        if index % self.block_rows < self.cpu_rows:
            return self.preprocess(record, rng)
        return CropPlan(self.preprocess)(record, rng)
