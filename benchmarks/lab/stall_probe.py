"""Where the input suite's slow steps come from: `python -m benchmarks.lab.stall_probe --out DIR`.

Runs the input suite's dataset, synthetic step and GPU-decoding `train` row (`fit`, 3 decode
threads), once per variant in `--variants` (`base`: as the suite does; `nogc`: Python's garbage
collector off for the run; `queued=N`: the loop `N` steps ahead of the step whose metrics it
reads, against `QUEUED_STEPS`; `switch=MS`: CPython's switch interval; `threads=N`: `N` decode
threads), and records beside each row's step timeline:
- the training thread's Python stack, sampled every `--sample-ms` by a thread of its own
  (`sys._current_frames`), and the longest gap between samples (a gap: no thread could take
  the GIL, or the sampler was starved);
- every XLA compilation (`jax.monitoring` duration events) and every garbage collection
  (`gc.callbacks`) with its time.
A slow step (more than `--slow` times the median interval) lists what those saw within it:
the most frequent leaf frames of the training thread, the compilations and collections, the
sample gap. With `--py-spy`, each row also records which threads held the interpreter (GIL)
for `--py-spy-seconds` past its first logged window, and in which frames. JSON:
`<out>/stall_probe.json`.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import gc
import itertools
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any
from unittest import mock

import jax

from benchmarks import input_pipeline as suite
from benchmarks.quick_model import quick_model_registered
from benchmarks.results import Results
from benchmarks.settings import Settings
from flax_attention.training import loop

VARIANTS = ("base", "nogc", "queued", "switch", "threads")


class Sampler(threading.Thread):
    """Samples `thread_id`'s stack (leaf-first, `depth` frames) every `interval` seconds."""

    def __init__(self, thread_id: int, interval: float, depth: int = 8):
        super().__init__(daemon=True)
        self.thread_id, self.interval, self.depth = thread_id, interval, depth
        self.samples: list[tuple[float, str]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(self.interval):
            frame = sys._current_frames().get(self.thread_id)
            if frame is None:
                continue
            stack = traceback.extract_stack(frame)[-self.depth :]
            self.samples.append((time.perf_counter(), leaf_first(stack)))


def leaf_first(stack: traceback.StackSummary) -> str:
    """`stack` as "file:function < caller < ...", innermost frame first."""
    return " < ".join(f"{Path(f.filename).name}:{f.name}" for f in reversed(stack))


@contextlib.contextmanager
def probes(sample_ms: float):
    """Yields (sampler, compiles, collections, triggers) while active: `compiles` and
    `collections` get (perf_counter, what, seconds), `triggers` (perf_counter, thread, stack)
    for each full collection's start."""
    compiles: list[tuple[float, str, float]] = []
    collections_: list[tuple[float, str, float]] = []
    triggers: list[tuple[float, str, str]] = []
    started: dict[int, float] = {}

    def on_duration(event: str, duration: float, **_: Any) -> None:
        if event.endswith("backend_compile_duration"):
            compiles.append((time.perf_counter(), event, duration))

    class CompileNames(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            message = record.getMessage()
            if message.startswith("Compiling "):
                compiles.append((time.perf_counter(), message[:160], 0.0))

    def on_gc(phase: str, info: dict) -> None:
        now = time.perf_counter()
        if phase == "start":
            started[info["generation"]] = now
            if info["generation"] == 2:  # who started a full collection, and from where
                stack = traceback.extract_stack()[-14:-1]
                triggers.append((now, threading.current_thread().name, leaf_first(stack)))
        else:
            begin = started.pop(info["generation"], now)
            collections_.append((begin, f"gen{info['generation']}", now - begin))

    jax.monitoring.register_event_duration_secs_listener(on_duration)
    names = CompileNames()
    jax_logger = logging.getLogger("jax")
    jax_logger.addHandler(names)
    jax.config.update("jax_log_compiles", True)
    gc.callbacks.append(on_gc)
    sampler = Sampler(threading.get_ident(), sample_ms / 1e3)
    sampler.start()
    try:
        yield sampler, compiles, collections_, triggers
    finally:
        sampler.stop.set()
        sampler.join()
        gc.callbacks.remove(on_gc)
        jax.config.update("jax_log_compiles", False)
        jax_logger.removeHandler(names)
        jax.monitoring.unregister_event_duration_listener(on_duration)


def slow_steps(
    timeline: list[tuple[float, float]],
    sampler: Sampler,
    compiles: list,
    collections_: list,
    slow: float,
    row: dict[str, Any],
) -> list[dict[str, Any]]:
    """The steps whose interval exceeds `slow` x the median, with what the probes saw in it and
    what the row recorded of it: the device's idle time before it, the GPU samples within it
    ([ms into the step, index, utilisation %, SM MHz, watts, celsius, reasons])."""
    stamps = [t for _, t in timeline]
    steps_ms = row.get("timeline_ms", [])
    gpu = [(stamps[0] + ms / 1e3, values) for ms, *values in row.get("gpu_samples_ms", [])]
    intervals = [b - a for a, b in itertools.pairwise(stamps)]
    if not intervals:
        return []
    median = statistics.median(intervals)
    out = []
    for i, interval in enumerate(intervals, start=1):
        if i < 3 or interval <= slow * median:  # the first steps hold the compilation
            continue
        begin, end = stamps[i - 1], stamps[i]
        inside = [(t, w) for t, w in sampler.samples if begin <= t <= end]
        times = [begin] + [t for t, _ in inside] + [end]
        out.append(
            {
                "step": i,
                "interval_ms": round(1e3 * interval, 1),
                "wait_ms": round(1e3 * timeline[i][0], 2),
                "device_idle_ms": steps_ms[i][2]
                if len(steps_ms) > i and len(steps_ms[i]) > 2
                else None,
                "gpu": [[round(1e3 * (t - begin), 1), *v] for t, v in gpu if begin <= t <= end],
                "samples": len(inside),
                "largest_sample_gap_ms": round(
                    1e3 * max(b - a for a, b in itertools.pairwise(times)), 1
                ),
                "stacks": collections.Counter(w for _, w in inside).most_common(4),
                "compiles": [
                    (round(1e3 * (t - begin), 1), e, round(1e3 * d, 1))
                    for t, e, d in compiles
                    if begin - d <= t <= end
                ],
                "collections": [
                    (round(1e3 * (t - begin), 1), g, round(1e3 * d, 2))
                    for t, g, d in collections_
                    if begin <= t <= end
                ],
            }
        )
    return out


@contextlib.contextmanager
def collector_off():
    """Python's garbage collector off (after a full collection) while active."""
    was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


class GilHolders(threading.Thread):
    """Once the training run is ``after_steps`` steps in, records this process for ``seconds``
    with py-spy (``--gil --threads --nonblocking``: each sample is the stack of the thread that
    held the interpreter then) into ``raw`` (py-spy's raw format: one line a stack, with its
    count)."""

    def __init__(self, py_spy: str, raw: Path, timeline: list, after_steps: int, seconds: int):
        super().__init__(daemon=True)
        self.py_spy, self.raw, self.timeline = py_spy, raw, timeline
        self.after_steps, self.seconds = after_steps, seconds
        self.error: str | None = None
        self.py_spy_says = ""  # py-spy's own count of samples taken and errors

    def run(self) -> None:
        deadline = time.perf_counter() + 600
        while len(self.timeline) < self.after_steps and time.perf_counter() < deadline:
            time.sleep(0.05)
        command = [self.py_spy, "record", "--pid", str(os.getpid()), "--gil", "--threads"]
        command += ["--nonblocking", "--rate", "200", "--duration", str(self.seconds)]
        command += ["--format", "raw", "--output", str(self.raw)]
        self.raw.parent.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            self.error = (done.stderr or done.stdout).strip()[-400:]
        said = [line for line in (done.stdout + done.stderr).splitlines() if "Samples:" in line]
        self.py_spy_says = said[-1] if said else ""

    def summary(self) -> dict[str, Any]:
        """Samples per thread name, and each thread's most frequent innermost frames."""
        if self.error is not None or not self.raw.exists():
            return {"error": self.error or "py-spy wrote nothing"}
        threads: collections.Counter = collections.Counter()
        leaves: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        for line in self.raw.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            if not stack or not count.isdigit():
                continue
            frames = stack.split(";")
            thread = frames[0].partition(": ")[2] or frames[0]
            threads[thread] += int(count)
            leaves[thread][" < ".join(reversed(frames[1:][-3:]))] += int(count)
        return {
            "py_spy": self.py_spy_says,
            "samples": sum(threads.values()),
            "threads": threads.most_common(),
            "frames": {t: leaves[t].most_common(5) for t, _ in threads.most_common(6)},
        }


def probed_train_row(
    res: Results, data_dir: Path, synthetic: float, args: argparse.Namespace, variant: str
) -> dict[str, Any]:
    shape = suite.QUICK if args.quick else suite.FULL
    timeline_holder: list = []
    original = suite.step_timeline

    @contextlib.contextmanager
    def keep_timeline():
        with original() as timeline:
            timeline_holder.append(timeline)
            spy = None
            if args.py_spy:
                raw = args.out / f"py_spy_{variant.replace('=', '_')}.txt"
                spy = GilHolders(args.py_spy, raw, timeline, shape.log_every, args.py_spy_seconds)
                spy.start()
            try:
                yield timeline
            finally:
                if spy is not None:
                    spy.join()
                    gil_holders.update(spy.summary())

    gil_holders: dict[str, Any] = {}
    suite.step_timeline = keep_timeline
    threads = 3 if args.decoder == "gpu" else None
    name, _, value = variant.partition("=")
    try:
        with contextlib.ExitStack() as undo:
            if name == "nogc":
                undo.enter_context(collector_off())
            elif name == "queued":
                undo.enter_context(mock.patch.object(loop, "QUEUED_STEPS", int(value)))
            elif name == "switch":
                undo.callback(sys.setswitchinterval, sys.getswitchinterval())
                sys.setswitchinterval(float(value) / 1e3)
            elif name == "threads":
                threads = int(value)
            with probes(args.sample_ms) as (sampler, compiles, collections_, triggers):
                suite.train_row(
                    res, data_dir, shape, res.settings, args.decoder, synthetic, threads
                )
    finally:
        suite.step_timeline = original
    row = res.rows[-1]
    timeline = timeline_holder[0]
    slow = slow_steps(timeline, sampler, compiles, collections_, args.slow, row)
    all_gaps = [b[0] - a[0] for a, b in itertools.pairwise(sampler.samples)]
    return {
        "variant": variant,
        **{
            k: row.get(k)
            for k in (
                "img_per_s",
                "time_weighted_of_synthetic",
                "slowest_window_of_synthetic",
                "device_idle_ms",
                "device_idle_steps",
                "gpu_sm_clock_mhz",
                "gpu_utilization_pct",
                "gpu_clock_event_reasons",
            )
        },
        "samples": len(sampler.samples),
        "sample_gaps_over_50ms": sum(g > 0.05 for g in all_gaps),
        "compiles_after_step_2": [
            (round(t - timeline[2][1], 3), e, round(d, 3))
            for t, e, d in compiles
            if len(timeline) > 2 and t > timeline[2][1]
        ][:40],
        "full_collection_triggers": collections.Counter(
            (thread, where) for _, thread, where in triggers
        ).most_common(8),
        "collections_over_10ms": [(g, round(1e3 * d, 1)) for _, g, d in collections_ if d > 0.01],
        "gil_holders": gil_holders,
        "slow_steps": slow,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.lab.stall_probe", description=__doc__)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--variants", default="base,nogc")
    p.add_argument("--sample-ms", type=float, default=5.0)
    p.add_argument("--slow", type=float, default=2.5, help="slow: interval > this x median")
    p.add_argument("--decoder", default="gpu", choices=("gpu", "cpu"))
    p.add_argument("--quick", action="store_true", help="CPU smoke: the suite's quick shape")
    p.add_argument("--synthetic", type=float, help="the synthetic step's img/s, not measured")
    p.add_argument("--py-spy", help="py-spy's path: record the GIL's holders in each row")
    p.add_argument("--py-spy-seconds", type=int, default=6)
    args = p.parse_args(argv)
    unknown = [v for v in args.variants.split(",") if v.partition("=")[0] not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}: each is one of {', '.join(VARIANTS)} (name=value)")
    shape = suite.QUICK if args.quick else suite.FULL
    res = Results("stall_probe_rows", Settings.make(args.quick, args.out))
    report: dict[str, Any] = {"device": str(jax.devices()[0].device_kind), "variants": []}
    quick_model = quick_model_registered() if args.quick else contextlib.nullcontext()
    with quick_model, tempfile.TemporaryDirectory() as scratch:
        data_dir = Path(scratch)
        suite.write_dataset(data_dir, shape)
        synthetic = args.synthetic or suite.synthetic_step_row(res, shape, res.settings)
        report["synthetic_img_per_s"] = round(synthetic)
        for variant in args.variants.split(","):
            report["variants"].append(probed_train_row(res, data_dir, synthetic, args, variant))
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "stall_probe.json").write_text(json.dumps(report, indent=1))
            (args.out / "stall_probe_rows.json").write_text(json.dumps(res.rows, indent=1))
    print(json.dumps(report, indent=1)[:6000])


if __name__ == "__main__":
    main()
