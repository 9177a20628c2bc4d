"""The `input` suite: can the ImageNet input path keep the accelerator busy?

On a photo-like JPEG dataset in tfds `imagenet2012` layout (`flax_attention.data.photos`:
1000 training images of 333-500 x 375-500 px at quality 90, with the odd images real ImageNet
has among them: CMYK and grayscale JPEGs, a PNG named .JPEG, one 4200 x 3150 px JPEG; `--quick`:
48 small ones), in one run:

- `host` rows: the host pipeline's images per CPU-second (one core, one process, no prefetch:
  `process_time` over every record of a pass), for the pipeline before this suite existed
  (`pil-float32`: tfds/Pillow decode, Pillow resize, float32 normalisation and batch), the CPU
  decoder (`cpu`: libjpeg-turbo + OpenCV, uint8 batches) and the host half of GPU decoding
  (`gpu-plan`: JPEG headers, crop draws, batching of the bytes); with the bytes a batch of 256
  carries to the device.
- `gpu-decode` row (CUDA only): `GpuJpegDecoder` on batches of 256 on the first GPU, decoded
  images per second, the host CPU it takes and its peak GPU memory; its difference from the CPU
  decoder's crops and from its host reference (`CpuReferenceDecoder`).
- `train` rows: `flax-attention train`'s loop (`fit`) on that dataset with each decoder (GPU
  decoding with 1 and with 3 `decode_threads`, batches decoded at once; `hybrid` with 3 decode
  threads and each `hybrid_cpu_share` of every batch decoded by CPU workers), on every local GPU
  (`parallel` jit, 256 rows per GPU; each GPU decodes its rows) or one CPU device: the median
  logged window over the second half of the run (`img_per_s`), images per second over every step
  after the first logged window (`img_per_s_time_weighted`), the slowest 10-step window, the
  machine's busy CPU cores over the steady windows (and the cores' worth of time the hypervisor
  took from them, `cpu_steal_cores`; the CPU model is the results' `host_cpu`), the decoders'
  peak GPU memory (`decoder_peak_mib`, the most any GPU held at once) and a per-step timeline
  (`timeline_ms`: [time the loop waited for the batch, time since the previous batch, the
  device's idle time before it (from the end of the step before it to when the loop called it;
  summed over the steps after the first window in `device_idle_ms`, counted in
  `device_idle_steps`)] per step; `epoch_steps` marks the epoch boundaries), the host time of
  the loop's calls of the compiled step after the first window (`step_call_ms`: median and
  longest) and, where nvidia-smi runs, every GPU sampled each 50 ms (`gpu_samples_ms`:
  [milliseconds since the first step's batch, GPU index, utilisation %, SM MHz, watts,
  celsius, clock event reasons bitmask], summarised in `gpu_sm_clock_mhz`,
  `gpu_utilization_pct` and `gpu_clock_event_reasons`) to attribute dips, next to the same
  training step on a device-resident synthetic batch. `python -m benchmarks` sets
  `CUDA_DEVICE_MAX_CONNECTIONS` for this suite as the training program does when it decodes on
  the GPU (`data.share_gpu_with_training`); the value is in the results'
  `cuda_device_max_connections`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import queue
import statistics
import tempfile
import threading
import time
from pathlib import Path

import jax
import numpy as np

from benchmarks.charts import ChartSpec, series
from benchmarks.cpu_usage import SteadyCpu
from benchmarks.gpu_samples import GpuSamples
from benchmarks.quick_model import QUICK_MODEL, quick_model_registered
from benchmarks.results import Results, error_text
from benchmarks.settings import Settings
from flax_attention import data
from flax_attention.data import photos, preprocess

DATASET = "imagenet2012"

CHART = ChartSpec(
    value="img_per_s",
    label="images / s (host: per CPU core)",
    group=lambda r: r["name"],
    series=series,
)


@dataclasses.dataclass(frozen=True)
class Shape:
    """Sizes of one run of the suite."""

    num_train: int
    heights: tuple[int, int]
    widths: tuple[int, int]
    image_size: int
    batch: int
    model: str
    steps: int
    log_every: int
    cpu_workers: int
    gpu_workers: int
    gpu_threads: tuple[int, ...]  # `decode_threads` of the GPU-decoding rows
    hybrid_workers: int
    hybrid_shares: tuple[float, ...]  # `hybrid_cpu_share` of the hybrid rows
    large_side: int  # the long side of the dataset's large image


FULL = Shape(
    num_train=1000,
    heights=(333, 500),
    widths=(375, 500),
    image_size=224,
    batch=256,
    model="seresnet50",
    steps=240,
    log_every=10,
    cpu_workers=14,
    gpu_workers=4,
    gpu_threads=(1, 3),
    hybrid_workers=10,
    hybrid_shares=(0.375,),
    large_side=photos.LARGE_SIDE,
)
QUICK = Shape(48, (60, 90), (70, 100), 32, 8, QUICK_MODEL, 6, 2, 1, 1, (2,), 1, (0.5,), 300)
WINDOW = 10  # steps of the slowest window
WORKERS = {"cpu": "cpu_workers", "gpu": "gpu_workers", "hybrid": "hybrid_workers"}
HYBRID_THREADS = 3  # decode threads of the hybrid rows


def pil_float32_transform(image: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """The augmentation as the pipeline computed it before: Pillow's resize on the crop box,
    float32 normalisation on the host (the decode is tfds' own, through Pillow)."""
    from PIL import Image

    spec = data.get_spec(DATASET)
    (top, left, h, w), flip = preprocess.imagenet_train_plan(*image.shape[:2], rng)
    pil = Image.fromarray(image).resize(
        (size, size), Image.Resampling.BILINEAR, box=(left, top, left + w, top + h)
    )
    out = np.asarray(pil)[:, ::-1] if flip else np.asarray(pil)
    return (out.astype(np.float32) / 255 - np.float32(spec.mean)) / np.float32(spec.std)


def _pil_float32_dataset(data_dir: Path, shape: Shape):
    """The old host pipeline: records decoded by tfds (Pillow), `pil_float32_transform`."""
    import grain
    import tensorflow_datasets as tfds

    source = tfds.data_source(DATASET, split="train", data_dir=data_dir, download=False)

    def transform(record: dict, rng: np.random.Generator) -> dict:
        image = pil_float32_transform(record["image"], shape.image_size, rng)
        return {"image": image, "label": np.int32(record["label"])}

    ds = grain.MapDataset.source(source).shuffle(seed=0).repeat(None)
    return ds.random_map(transform, seed=0).batch(shape.batch, drop_remainder=True)


def _host_datasets(data_dir: Path, shape: Shape) -> dict:
    common = {"train": True, "batch_size": shape.batch, "data_dir": data_dir}
    return {
        "pil-float32": _pil_float32_dataset(data_dir, shape),
        "cpu": data.make_dataset(DATASET, **common, image_size=shape.image_size),
        "gpu-plan": data.make_dataset(DATASET, **common, decoder=data.GpuDecoder()),
    }


def _batch_bytes(batch: dict) -> int:
    return sum(np.asarray(v).nbytes for v in batch.values())


def host_rows(res: Results, data_dir: Path, shape: Shape) -> None:
    """Images per CPU-second of each host pipeline, over about one epoch, one core."""
    batches = max(shape.num_train // shape.batch, 2)
    for name, ds in _host_datasets(data_dir, shape).items():
        ds[0]  # Opens files and warms caches; not timed.
        cpu, wall = time.process_time(), time.perf_counter()
        sizes = [_batch_bytes(ds[i]) for i in range(1, batches + 1)]
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        images = batches * shape.batch
        res.add(
            {
                "name": "host",
                "impl": name,
                "images": images,
                "img_per_cpu_s": round(images / cpu, 1),
                "img_per_s": round(images / wall, 1),
                "ms_per_img": round(1e3 * cpu / images, 3),
                "bytes_per_img": round(statistics.mean(sizes) / shape.batch),
                "mb_per_batch_256": round(statistics.mean(sizes) / shape.batch * 256 / 2**20, 1),
            }
        )


def gpu_decode_rows(res: Results, data_dir: Path, shape: Shape, settings: Settings) -> None:
    """GpuJpegDecoder alone on prepared plan batches on the first GPU; its crops against the
    CPU decoder's and against its host reference's (the same arithmetic, libjpeg-turbo)."""
    if not data.gpu_decoding_available():
        res.add({"name": "gpu-decode", "impl": "nvimgcodec", "skipped": "no CUDA GPU/nvImageCodec"})
        return
    from flax_attention.data.gpu_decode import DECODER_MEMORY

    common = {"train": True, "batch_size": shape.batch, "data_dir": data_dir}
    plans = data.make_dataset(DATASET, **common, decoder=data.GpuDecoder())
    cpu_crops = data.make_dataset(DATASET, **common, image_size=shape.image_size)[0]["image"]
    batches = [plans[i] for i in range(4)]
    decode = data.GpuJpegDecoder(shape.image_size)
    jax.block_until_ready(decode(batches[0]))  # The first batch makes the thread's decoder.
    DECODER_MEMORY.reset()
    repeats = 3 if settings.quick else 12
    cpu_start, start = time.process_time(), time.perf_counter()
    for i in range(repeats):
        jax.block_until_ready(decode(batches[i % len(batches)]))
    wall, cpu_s = time.perf_counter() - start, time.process_time() - cpu_start
    images = repeats * shape.batch
    gpu = np.asarray(decode(batches[0])["image"]).astype(int)
    reference = np.asarray(data.CpuReferenceDecoder(shape.image_size)(batches[0])["image"])
    diff, to_reference = np.abs(gpu - cpu_crops), np.abs(gpu - reference)
    res.add(
        {
            "name": "gpu-decode",
            "impl": "nvimgcodec",
            "img_per_s": round(images / wall, 1),
            "host_cpu_ms_per_img": round(1e3 * cpu_s / images, 3),
            "decoder_peak_mib": _peak_mib(),
            "vs_cpu_decoder_mean_abs": round(float(diff.mean()), 3),
            "vs_cpu_decoder_p99_abs": float(np.percentile(diff, 99)),
            "vs_host_reference_mean_abs": round(float(to_reference.mean()), 3),
            "vs_host_reference_max_abs": int(to_reference.max()),
        }
    )


def _peak_mib() -> float | None:
    """The most GPU memory any device's decoders held at once since the last reset, MiB."""
    from flax_attention.data.gpu_decode import DECODER_MEMORY

    peaks = DECODER_MEMORY.peak_bytes().values()
    return round(max(peaks) / 2**20, 1) if peaks else None


def _devices() -> int:
    """The devices a training row runs on: every local GPU, else one device."""
    return jax.local_device_count() if jax.default_backend() == "gpu" else 1


def synthetic_step_row(res: Results, shape: Shape, settings: Settings) -> float:
    """The training step alone on a device-resident uint8 batch (``shape.batch`` rows per
    device, on ``_devices()`` devices): the rate to keep up with."""
    from functools import partial

    from flax_attention.training import create_train_state, make_optimizer, make_parallel
    from flax_attention.training.config import PRECISIONS
    from flax_attention.training.loop import build_model
    from flax_attention.training.steps import train_step

    spec = data.get_spec(DATASET)
    precision = "fp32" if settings.quick else "bf16"
    model = build_model(shape.model, num_classes=1000, seed=0, dtype=PRECISIONS[precision])
    tx = make_optimizer("sgd", 0.1, weight_decay=5e-5, momentum=0.9)
    graphdef, state = create_train_state(model, tx)
    devices = _devices()
    form = make_parallel("jit" if devices > 1 else "none")
    form.prepare_model(model)
    step = form.compile_train(partial(train_step, graphdef, tx, mean=spec.mean, std=spec.std))
    rng = np.random.default_rng(0)
    size, rows = shape.image_size, shape.batch * devices
    batch = form.put_batch(
        {
            "image": rng.integers(0, 256, (rows, size, size, 3), np.uint8),
            "label": rng.integers(0, 1000, rows).astype(np.int32),
        }
    )
    state = form.put_state(jax.device_put(state, form.replicated))
    for _ in range(3):
        state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    count = 3 if settings.quick else 30
    with GpuSamples() as gpu:
        start = time.perf_counter()
        for _ in range(count):
            state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
        rate = count * rows / (time.perf_counter() - start)
    res.add(
        {
            "name": "train",
            "impl": "synthetic",
            "model": shape.model,
            "devices": devices,
            "img_per_s": round(rate),
            **gpu.figures(start),
        }
    )
    return rate


class StepTimeline(list):
    """Per step of a training run, (seconds the loop waited for the batch, ``perf_counter`` when
    it got it); per call of the training step, ``step_called``: the ``perf_counter`` when the
    loop called it, ``step_returned``: when the call returned (the step dispatched), and
    ``step_done``: when every local device had run it, as a thread of its own waiting on the
    step's outputs saw it (late by that thread's wake-up, never early)."""

    def __init__(self) -> None:
        super().__init__()
        self.step_called: list[float] = []
        self.step_returned: list[float] = []
        self.step_done: list[float] = []


@contextlib.contextmanager
def step_timeline():
    """While active, the training loop's batches (``data.prefetch_to_device``, which ``fit``
    draws from) are timed, and so is every training step the parallel forms compile
    (``compile_train``): yields the ``StepTimeline`` that gets them."""
    from flax_attention.training import parallel

    timeline = StepTimeline()
    prefetch = data.prefetch_to_device
    compilers = {
        form: form.__dict__["compile_train"] for form in (parallel.MeshForm, parallel.PmapForm)
    }
    outputs: queue.Queue = queue.Queue()

    def watch() -> None:
        while (metrics := outputs.get()) is not None:
            jax.block_until_ready(metrics)
            timeline.step_done.append(time.perf_counter())

    def timed_batches(*args, **kwargs):
        stream = prefetch(*args, **kwargs)
        try:
            while True:
                start = time.perf_counter()
                try:
                    item = next(stream)
                except StopIteration:
                    return
                now = time.perf_counter()
                timeline.append((now - start, now))
                yield item
        finally:
            stream.close()

    def timed_compile(compile_train):
        def compile_timed(form, step):
            compiled = compile_train(form, step)

            def call(state, batch):
                timeline.step_called.append(time.perf_counter())
                state, metrics = compiled(state, batch)
                timeline.step_returned.append(time.perf_counter())
                outputs.put(metrics)  # the metrics only: the state is donated to the next step
                return state, metrics

            return call

        return compile_timed

    watcher = threading.Thread(target=watch, name="step_watch", daemon=True)
    watcher.start()
    data.prefetch_to_device = timed_batches
    for form, compile_train in compilers.items():
        form.compile_train = timed_compile(compile_train)
    try:
        yield timeline
    finally:
        data.prefetch_to_device = prefetch
        for form, compile_train in compilers.items():
            form.compile_train = compile_train
        outputs.put(None)
        watcher.join(timeout=60)


def timeline_figures(
    timeline: list[tuple[float, float]], rows: int, skip: int
) -> dict[str, float | list]:
    """From a step timeline: images per second over the steps after the first ``skip``
    (time-weighted), the slowest ``WINDOW``-step window among them, and the timeline itself in
    milliseconds ([wait, time since the previous step] per step). From a ``StepTimeline`` with
    every step's call and end, also the device's idle time before each step (from the end of
    the step before it to when the loop called it: the least it can have waited for the loop)
    as each step's third number, and its sum and count over the steps after ``skip``
    (``device_idle_ms``, ``device_idle_steps``: over 1 ms); with the calls' returns, the host
    time of a step call (``step_call_ms``: median and longest after ``skip``)."""
    stamps = [t for _, t in timeline]
    intervals = [0.0] + [b - a for a, b in itertools.pairwise(stamps)]
    steps = [
        [round(1e3 * w, 2), round(1e3 * i, 2)]
        for (w, _), i in zip(timeline, intervals, strict=True)
    ]
    out: dict[str, float | list] = {"timeline_ms": steps}
    called = getattr(timeline, "step_called", [])
    done = getattr(timeline, "step_done", [])
    if len(called) == len(done) == len(stamps):
        idle = [0.0] + [
            round(1e3 * max(c - d, 0.0), 2) for c, d in zip(called[1:], done, strict=False)
        ]
        for step, ms in zip(steps, idle, strict=True):
            step.append(ms)
        out["device_idle_ms"] = round(sum(idle[skip:]), 1)
        out["device_idle_steps"] = sum(ms > 1.0 for ms in idle[skip:])
    returned = getattr(timeline, "step_returned", [])
    if len(returned) == len(called) > skip:
        calls = [1e3 * (r - c) for c, r in zip(called[skip:], returned[skip:], strict=True)]
        out["step_call_ms"] = [round(statistics.median(calls), 2), round(max(calls), 2)]
    if len(stamps) > skip + WINDOW:
        out["img_per_s_time_weighted"] = round(
            rows * (len(stamps) - skip) / (stamps[-1] - stamps[skip - 1])
        )
        windows = [
            rows * WINDOW / (stamps[i + WINDOW] - stamps[i])
            for i in range(skip - 1, len(stamps) - WINDOW)
        ]
        out["slowest_window_img_per_s"] = round(min(windows))
    return out


def train_row(
    res: Results,
    data_dir: Path,
    shape: Shape,
    settings: Settings,
    decoder: str,
    synthetic: float,
    decode_threads: int | None = None,
    cpu_share: float | None = None,
) -> None:
    """`fit` on the JPEG dataset with `decoder` (and `decode_threads` for GPU decoding,
    `cpu_share` for hybrid decoding) on `_devices()` devices: images/s after warm-up (median
    window, time-weighted, slowest window), CPU cores used, decoder memory, step timeline."""
    from flax_attention.data.gpu_decode import DECODER_MEMORY
    from flax_attention.training import TrainConfig, fit
    from flax_attention.training.metrics import MetricsLog

    workers = getattr(shape, WORKERS[decoder])
    devices = _devices()
    threads = {} if decode_threads is None else {"decode_threads": decode_threads}
    hybrid = {} if cpu_share is None else {"hybrid_cpu_share": cpu_share}
    with tempfile.TemporaryDirectory() as workdir:
        config = TrainConfig(
            model=shape.model,
            dataset=DATASET,
            data_dir=str(data_dir),
            workdir=workdir,
            steps=shape.steps,
            batch_size=shape.batch * devices,
            image_size=shape.image_size,
            precision="fp32" if settings.quick else "bf16",
            parallel="jit" if devices > 1 else "none",
            num_workers=workers,
            decoder=decoder,
            **threads,
            **hybrid,
            log_every=shape.log_every,
            checkpoint_every=10 * shape.steps,
            eval_batch_size=shape.batch,
            progress=False,
        )
        windows = shape.steps // shape.log_every
        steady_cpu = SteadyCpu(Path(workdir) / "metrics.jsonl", windows // 2 + 1, windows)
        DECODER_MEMORY.reset()
        start = time.perf_counter()
        try:
            with steady_cpu, step_timeline() as timeline, GpuSamples() as gpu:
                fit(config)
        except Exception as e:  # A failed configuration is a row, not the end of the suite.
            res.add(
                {"name": "train", "impl": decoder, "workers": workers, **hybrid}
                | {"error": error_text(e)}
            )
            return
        wall = time.perf_counter() - start
        records = MetricsLog(Path(workdir) / "metrics.jsonl").records()
    rates = [r["images_per_s"] for r in records if "images_per_s" in r]
    steady = rates[len(rates) // 2 :] or rates  # Past compilation and the initial buffer.
    rate = statistics.median(steady)
    figures = timeline_figures(timeline, shape.batch * devices, shape.log_every)
    skip = shape.log_every  # the GPU summarised over the steps the time-weighted rate counts
    counted = (timeline[skip - 1][1], timeline[-1][1]) if len(timeline) > skip else None
    figures |= gpu.figures(timeline[0][1] if timeline else start, counted)
    relative = {
        f"{name}_of_synthetic": round(figures[key] / synthetic, 3)
        for name, key in (
            ("time_weighted", "img_per_s_time_weighted"),
            ("slowest_window", "slowest_window_img_per_s"),
        )
        if key in figures
    }
    res.add(
        {
            "name": "train",
            "impl": decoder,
            "model": shape.model,
            "devices": devices,
            "workers": workers,
            **threads,
            **hybrid,
            "img_per_s": round(rate),
            "img_per_s_windows": [round(r) for r in steady],
            "of_synthetic": round(rate / synthetic, 3),
            "cpu_cores_used": None if steady_cpu.cores is None else round(steady_cpu.cores, 1),
            "cpu_steal_cores": None
            if steady_cpu.steal_cores is None
            else round(steady_cpu.steal_cores, 2),
            "decoder_peak_mib": _peak_mib() if decoder != "cpu" else None,
            "wall_s": round(wall, 1),
            "epoch_steps": shape.num_train // (shape.batch * devices),
            **relative,
            **figures,
        }
    )


def host_cpu() -> str | None:
    """The host CPU's model name (Linux ``/proc/cpuinfo``), None where it is not given."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return None
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else None


def run(settings: Settings, data_dir: Path | None = None) -> Results:
    shape = QUICK if settings.quick else FULL
    res = Results("input", settings)
    res.meta.update(
        shape=dataclasses.asdict(shape),
        host_cores=len(os.sched_getaffinity(0)),
        host_cpu=host_cpu(),
        cuda_device_max_connections=os.environ.get("CUDA_DEVICE_MAX_CONNECTIONS"),
        suite_doc=__doc__.strip(),
    )
    quick_model = quick_model_registered() if settings.quick else contextlib.nullcontext()
    with quick_model, tempfile.TemporaryDirectory() as scratch:
        data_dir = data_dir or Path(scratch)
        start = time.perf_counter()
        path = write_dataset(data_dir, shape)
        res.meta["dataset"] = {
            "write_s": round(time.perf_counter() - start, 1),
            "mean_jpeg_kb": round(_mean_jpeg_kb(data_dir), 1),
            "path_name": path.name,
        }
        host_rows(res, data_dir, shape)
        gpu_decode_rows(res, data_dir, shape, settings)
        synthetic = synthetic_step_row(res, shape, settings)
        train_row(res, data_dir, shape, settings, "cpu", synthetic)
        if not data.gpu_decoding_available():
            for decoder in ("gpu", "hybrid"):
                res.add({"name": "train", "impl": decoder, "skipped": "no CUDA GPU/nvImageCodec"})
        else:
            for threads in shape.gpu_threads:
                train_row(res, data_dir, shape, settings, "gpu", synthetic, threads)
            for share in shape.hybrid_shares:
                train_row(
                    res, data_dir, shape, settings, "hybrid", synthetic, HYBRID_THREADS, share
                )
    return res


def write_dataset(data_dir: Path, shape: Shape) -> Path:
    """The suite's photo-like JPEG dataset for `shape`, odd images included, under
    `data_dir`; returns its folder."""
    return photos.write_photo_dataset(
        data_dir,
        num_train=shape.num_train,
        num_eval=max(shape.batch, 16),
        heights=shape.heights,
        widths=shape.widths,
        odd_images=True,
        large_side=shape.large_side,
    )


def _mean_jpeg_kb(data_dir: Path) -> float:
    source = data.data_source(DATASET, "train", data_dir)
    count = min(len(source), 64)
    return statistics.mean(len(source[i]["image"]) for i in range(count)) / 1024


def main(argv: list[str] | None = None) -> None:
    """`python -m benchmarks.input_pipeline --host-only`: the host rows alone, at full size, on a
    machine without an accelerator (the per-core figures of the CPU decoder)."""
    import argparse

    from benchmarks.settings import RESULTS

    parser = argparse.ArgumentParser(prog="python -m benchmarks.input_pipeline")
    parser.add_argument("--host-only", action="store_true", required=True)
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    args = parser.parse_args(argv)
    res = Results("input_host", Settings.make(False, args.out))
    res.meta.update(
        shape=dataclasses.asdict(FULL), host_cores=len(os.sched_getaffinity(0)), host_cpu=host_cpu()
    )
    with tempfile.TemporaryDirectory() as scratch:
        photos.write_photo_dataset(
            scratch, num_train=FULL.num_train, num_eval=16, heights=FULL.heights, widths=FULL.widths
        )
        res.meta["load_average"] = os.getloadavg()
        host_rows(res, Path(scratch), FULL)
    res.write()
    print(res.path)


if __name__ == "__main__":
    main()
