"""Where training JPEGs are decoded: one object per kind, chosen by name (``--decoder``).

A decoder owns the whole path of a training batch from records to the device:

- its host-side plan (``plan``, ``batch``): what grain does per record and per batch (decode
  and augment, or only read the JPEG headers and draw the crops);
- its evaluation plan (``plan_eval``): the same for the evaluation split (centre crops);
- its device finish (``input_to_device``): the host batch to the step's device batch (a copy,
  or decoding, cropping and resizing on each device for the rows it holds before it);
- its threads (``threads``): host batches finished at once, each on a prefetch thread;
- its process setup (``prepare_process``): what must happen before JAX first uses the GPU.

``CpuDecoder`` decodes in the loader, ``GpuDecoder`` on the GPU (nvImageCodec), and
``HybridDecoder`` part of every batch each way (evaluation: as ``GpuDecoder``).
``choose_decoder`` maps a ``--decoder`` name ("auto", "cpu", "gpu", "hybrid") to one of them.
"""

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import jax
from jax.sharding import Sharding

from flax_attention.data.gpu_decode import (
    GpuJpegDecoder,
    gpu_decoding_available,
    reserve_gpu_memory,
    share_gpu_with_training,
)
from flax_attention.data.per_device import DeviceDecoderFactory, PerDeviceDecoder
from flax_attention.data.plans import CenterCropPlan, CropPlan, collate_plans
from flax_attention.data.preprocess import EvalPreprocess, TrainPreprocess
from flax_attention.data.registry import get_spec
from flax_attention.data.split_decode import SplitPlan, block_rows_of, cpu_rows_of, with_index

if TYPE_CHECKING:
    import grain

PutBatch = Callable[[dict[str, Any]], dict[str, jax.Array]]


class Decoder(Protocol):
    """What the input pipeline and the training loop ask of a decoder (see the module
    docstring)."""

    threads: int
    eval_on_device: bool  # evaluation batches are plan batches (``plans.pad_plans`` pads them)

    def plan(
        self,
        stream: "grain.MapDataset",
        preprocess: TrainPreprocess,
        batch_size: int,
        seed: int,
        devices: int = 1,
    ) -> "grain.MapDataset": ...

    def batch(self, rows: "grain.MapDataset", batch_size: int) -> "grain.MapDataset": ...

    def plan_eval(
        self, records: "grain.MapDataset", preprocess: EvalPreprocess, batch_size: int
    ) -> "grain.MapDataset": ...

    def input_to_device(
        self, put_batch: PutBatch, image_size: int, sharding: Sharding | None = None
    ) -> PutBatch: ...

    def check_batch(self, batch_size: int, devices: int) -> None: ...

    def notes(self, num_workers: int) -> list[str]: ...


@dataclasses.dataclass(frozen=True)
class CpuDecoder:
    """Decodes and augments every record in the loader (``TrainPreprocess``: libjpeg-turbo and
    OpenCV, in its worker processes or threads); the device only receives uint8 pixels."""

    threads: ClassVar[int] = 1  # a host-to-device copy needs no more
    eval_on_device: ClassVar[bool] = False

    @classmethod
    def from_settings(cls, *, threads: int, cpu_share: float) -> "CpuDecoder":
        """The decoder; it has no settings of its own."""
        return cls()

    @staticmethod
    def prepare_process(dataset: str) -> None:
        """Nothing to prepare."""

    @staticmethod
    def problems(dataset: str) -> list[str]:
        """Why it cannot be used here: never."""
        return []

    def plan(
        self,
        stream: "grain.MapDataset",
        preprocess: TrainPreprocess,
        batch_size: int,
        seed: int,
        devices: int = 1,
    ) -> "grain.MapDataset":
        """Each record of the training stream decoded and augmented with ``preprocess`` (on
        any number of ``devices``)."""
        return stream.random_map(preprocess, seed=seed)

    def batch(self, rows: "grain.MapDataset", batch_size: int) -> "grain.MapDataset":
        """Whole batches of ``batch_size`` rows, stacked: {"image": uint8 (B, S, S, C),
        "label": int32 (B,)}."""
        return rows.batch(batch_size, drop_remainder=True)

    def plan_eval(
        self, records: "grain.MapDataset", preprocess: EvalPreprocess, batch_size: int
    ) -> "grain.MapDataset":
        """Evaluation records decoded with ``preprocess``, in batches of ``batch_size`` (the
        last may be smaller)."""
        return records.map(preprocess).batch(batch_size)

    def input_to_device(
        self, put_batch: PutBatch, image_size: int, sharding: Sharding | None = None
    ) -> PutBatch:
        """The host batch copied to the device as it is: ``put_batch``."""
        return put_batch

    def check_batch(self, batch_size: int, devices: int) -> None:
        """Any process batch of ``batch_size`` rows over ``devices`` devices will do."""

    def notes(self, num_workers: int) -> list[str]:
        """Nothing to say about the run's loader."""
        return []


@dataclasses.dataclass(frozen=True)
class GpuDecoder:
    """Decodes on the GPUs: the loader reads each JPEG's header and draws its crop and flip
    (``plans.CropPlan``, the CPU decoder's choices for the record; images the GPU does not
    take are decoded there), each local device decodes the crops of the rows it holds and
    resizes them (``per_device.PerDeviceDecoder`` over ``GpuJpegDecoder``). ``threads``
    batches are decoded at once, each on a thread with its own CUDA stream per device.
    ``plan_decoder``: builds a device's batch decoder for an image side (``GpuJpegDecoder``;
    tests give a CPU stand-in)."""

    threads: int = 3
    plan_decoder: DeviceDecoderFactory = GpuJpegDecoder
    eval_on_device: ClassVar[bool] = True

    @classmethod
    def from_settings(cls, *, threads: int, cpu_share: float) -> "GpuDecoder":
        """The decoder with ``threads`` decoding threads."""
        return cls(threads=threads)

    @staticmethod
    def prepare_process(dataset: str) -> None:
        """For a JPEG dataset: CUDA hardware queues of its own for decoding
        (``share_gpu_with_training``) and GPU memory kept outside XLA's share
        (``reserve_gpu_memory``); call it before JAX first uses the GPU."""
        if get_spec(dataset).gpu_decodable:
            share_gpu_with_training()
            reserve_gpu_memory()

    @staticmethod
    def problems(dataset: str) -> list[str]:
        """Why it cannot decode ``dataset`` here (starts JAX's backends): every local device
        must be a CUDA GPU, in any number of processes."""
        problems = []
        if not get_spec(dataset).gpu_decodable:
            problems.append(f"dataset {dataset!r} is not stored as JPEG")
        if not gpu_decoding_available():
            problems.append(
                "it needs CUDA GPUs as every local device, with nvImageCodec and CuPy "
                "(pip install 'flax-attention[gpu-decode]')"
            )
        return problems

    def plan(
        self,
        stream: "grain.MapDataset",
        preprocess: TrainPreprocess,
        batch_size: int,
        seed: int,
        devices: int = 1,
    ) -> "grain.MapDataset":
        """Each record's crop plan (JPEG bytes, crop box, flip, label; no pixel decoded), or
        its pixels for an image the GPU does not take (``plans.CropPlan``), whatever the
        number of ``devices``."""
        return stream.random_map(CropPlan(preprocess), seed=seed)

    def batch(self, rows: "grain.MapDataset", batch_size: int) -> "grain.MapDataset":
        """Whole batches of ``batch_size`` rows as arrays (``plans.collate_plans``)."""
        return rows.batch(batch_size, drop_remainder=True, batch_fn=collate_plans)

    def plan_eval(
        self, records: "grain.MapDataset", preprocess: EvalPreprocess, batch_size: int
    ) -> "grain.MapDataset":
        """Evaluation records as centre-crop plans (``plans.CenterCropPlan``), in plan
        batches of ``batch_size`` rows (the last may be smaller)."""
        return records.map(CenterCropPlan(preprocess)).batch(batch_size, batch_fn=collate_plans)

    def input_to_device(
        self, put_batch: PutBatch, image_size: int, sharding: Sharding | None = None
    ) -> PutBatch:
        """Plan batch -> the batch decoded, cropped and resized to ``image_size``, each
        device's rows of ``sharding`` on that device (None: the first local device), then
        placed by ``put_batch``. Thread-safe."""
        decode = PerDeviceDecoder(self.plan_decoder, image_size, sharding, self.threads)
        return lambda batch: put_batch(decode(batch))

    def check_batch(self, batch_size: int, devices: int) -> None:
        """Any process batch of ``batch_size`` rows over ``devices`` devices will do."""

    def notes(self, num_workers: int) -> list[str]:
        """Nothing to say about the run's loader."""
        return []


@dataclasses.dataclass(frozen=True)
class HybridDecoder(GpuDecoder):
    """Decodes ``cpu_share`` of the rows each device holds of every training batch as
    ``CpuDecoder`` does (in the loader's worker processes; the first ``cpu_rows_of(rows,
    cpu_share)`` of each device's ``rows``) and the others as ``GpuDecoder`` does (see
    ``split_decode``); evaluates as ``GpuDecoder``. Same requirements and process setup as
    ``GpuDecoder``."""

    cpu_share: float = 0.375

    @classmethod
    def from_settings(cls, *, threads: int, cpu_share: float) -> "HybridDecoder":
        """The decoder with ``threads`` decoding threads and ``cpu_share`` of rows on the CPU."""
        return cls(threads=threads, cpu_share=cpu_share)

    def plan(
        self,
        stream: "grain.MapDataset",
        preprocess: TrainPreprocess,
        batch_size: int,
        seed: int,
        devices: int = 1,
    ) -> "grain.MapDataset":
        """Each record decoded with ``preprocess`` if its row in its process batch of
        ``batch_size`` rows is a CPU row, its crop plan otherwise (``SplitPlan``): the first
        ``cpu_rows_of(batch_size / devices, cpu_share)`` rows of each of the ``devices``
        devices' blocks of the batch; a ``ValueError`` when the rows do not split evenly over
        the devices or a device would hold a single row."""
        split = SplitPlan.spread(preprocess, batch_size, devices, self.cpu_share)
        return stream.map_with_index(with_index).random_map(split, seed=seed)

    def check_batch(self, batch_size: int, devices: int) -> None:
        """A ``ValueError`` when process batches of ``batch_size`` rows cannot be split over
        ``devices`` devices with CPU and GPU rows on each (see ``plan``)."""
        cpu_rows_of(block_rows_of(batch_size, devices), self.cpu_share)

    def notes(self, num_workers: int) -> list[str]:
        """Advice when the CPU rows would be decoded in the training process itself."""
        if num_workers:
            return []
        return [
            "note: --decoder hybrid with --num-workers 0 decodes its CPU rows in this "
            "process, beside the GPU decoder; give it worker processes (--num-workers N)"
        ]


CPU_DECODER = CpuDecoder()  # the pipeline's default

_CANDIDATES: dict[str, tuple[type[CpuDecoder | GpuDecoder], ...]] = {
    "auto": (GpuDecoder, CpuDecoder),
    "cpu": (CpuDecoder,),
    "gpu": (GpuDecoder,),
    "hybrid": (HybridDecoder,),
}
DECODERS = tuple(_CANDIDATES)


def _candidates(name: str) -> tuple[type[CpuDecoder | GpuDecoder], ...]:
    """The decoder kinds ``name`` may resolve to, the preferred first."""
    if name not in _CANDIDATES:
        raise ValueError(f"unknown decoder {name!r}; choose one of {list(DECODERS)}")
    return _CANDIDATES[name]


def prepare_decoding(name: str, dataset: str) -> None:
    """The process setup of every decoder ``--decoder name`` may resolve to for ``dataset``.

    Call it before JAX first uses the GPU (choosing a decoder starts JAX's backends, so the
    setup cannot wait for the choice); a ``ValueError`` for an unknown name."""
    for kind in _candidates(name):
        kind.prepare_process(dataset)


def choose_decoder(
    name: str, dataset: str, *, threads: int = 3, cpu_share: float = 0.375
) -> Decoder:
    """The decoder ``--decoder name`` means for the training split of ``dataset`` here, with
    ``threads`` GPU decoding threads and ``cpu_share`` of each batch on the CPU (hybrid).

    "auto" is ``GpuDecoder`` where it applies (a JPEG dataset, every local device a CUDA GPU,
    nvImageCodec and CuPy; any number of processes) and ``CpuDecoder`` elsewhere; "gpu" or "hybrid" where it cannot
    apply is a ``ValueError`` saying why, as is an unknown name.
    """
    candidates = _candidates(name)
    for kind in candidates:
        problems = kind.problems(dataset)
        if not problems:
            return kind.from_settings(threads=threads, cpu_share=cpu_share)
    raise ValueError(f"--decoder {name} cannot be used: {'; '.join(problems)}")
