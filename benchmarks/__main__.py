"""Run the benchmark suites: `python -m benchmarks [--quick] [--suites train,modules]`.

The default is every one-GPU suite; `scaling` needs several GPUs (`--suites scaling`);
`--suites tpu_aot` (alone, its own flags: benchmarks/tpu_aot.py) compiles for TPU slices. First
every case is compiled by parallel worker processes into persistent caches (benchmarks/warm.py;
`--no-warm` skips this), then the suites are timed in this process.

Writes benchmarks/results/<device>/<suite>.json (and a PNG chart per suite when matplotlib is
importable); `--quick` uses tiny shapes and writes under <device>-quick (a CPU smoke test).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path
from types import ModuleType

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch shares the GPU

from benchmarks import input_pipeline, modules, scaling, tpu_aot, train, warm
from benchmarks.caches import (
    AUTOTUNE_STORE,
    autotune_cache_dir,
    autotune_store_path,
    clear_caches,
    enable_caches,
    seed_autotune,
)
from benchmarks.charts import chart
from benchmarks.device import device_name, device_slug, gpu_memory_gb
from benchmarks.results import Results
from benchmarks.settings import RESULTS, ROOT, Settings
from flax_attention.data import share_gpu_with_training

# name -> the suite's module: its `run(settings, ...) -> Results` and its `CHART`
SUITES: dict[str, ModuleType] = {
    "train": train,
    "modules": modules,
    "scaling": scaling,
    "input": input_pipeline,
}
# Per-suite sampling, sized so the one-GPU suites fit one run: whole training steps take ~50 ms
# (fewer, longer samples); a module takes 0.05-1.5 ms.
SAMPLING: dict[str, dict[str, float]] = {
    "train": {"samples": 6, "sample_ms": 300.0},
    "modules": {"samples": 10, "sample_ms": 20.0},
    "scaling": {"samples": 10, "sample_ms": 300.0},
}
MAIN_GPU_GB = 8.0  # what this process holds while the workers compile
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "flax-attention-bench"


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    p.add_argument("--quick", action="store_true", help="tiny shapes, few samples (CPU smoke)")
    p.add_argument("--suites", default="train,modules", help="comma-separated suites")
    p.add_argument("--modules", default=",".join(modules.CASES), help="modules suite: which")
    p.add_argument("--models", default=",".join(train.MODELS), help="train suite: which")
    p.add_argument(
        "--frameworks", default="flax,torch,torch.compile", help="modules, train: which frameworks"
    )
    p.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    p.add_argument("--charts-only", action="store_true", help="redraw PNGs from existing JSON")
    p.add_argument(
        "--cache",
        type=Path,
        default=CACHE,
        help="persistent compilation caches (a run starts by deleting its own folders in it: "
        "jax, inductor, triton, warm; other files stay)",
    )
    p.add_argument(
        "--jobs",
        type=int,
        default=max(1, min(8, (os.cpu_count() or 2) // 2)),
        help="parallel compile workers",
    )
    p.add_argument("--no-warm", action="store_true", help="no parallel compile phase")
    p.add_argument("--keep-cache", action="store_true", help="start from the caches of a last run")
    p.add_argument("--warm-only", action="store_true", help="(worker) compile and run once each")
    p.add_argument(
        "--autotune-dir", type=Path, default=AUTOTUNE_STORE, help="recorded autotuning, per device"
    )
    return p.parse_args(argv)


def shard_list(args: argparse.Namespace, suites: list[str], frameworks: list[str]) -> list:
    """The warm phase's shards for `suites` and `frameworks`, longest first (as last run)."""
    split = lambda text: [s for s in text.split(",") if s]  # noqa: E731
    seconds = warm.recorded_seconds(args.out / device_slug(args.quick))
    out = warm.shards(suites, split(args.models), split(args.modules), frameworks, seconds)
    return [replace(s, args=(*s.args, "--quick")) for s in out] if args.quick else out


def warm_phase(args: argparse.Namespace, suites: list[str]) -> tuple[dict, Path]:
    """Compile every case of `suites` in parallel workers; returns their summary and folder."""
    work = args.cache / "warm"
    shutil.rmtree(work, ignore_errors=True)
    split = lambda text: [s for s in text.split(",") if s]  # noqa: E731
    all_shards = shard_list(args, suites, split(args.frameworks))
    store = autotune_store_path(args.autotune_dir, device_slug(args.quick))
    if not store.exists():
        # No autotuning recorded for this GPU: ours would autotune under contention, so they
        # compile in the timing process instead, alone on the GPU (torch.compile still warms).
        all_shards = [s for s in all_shards if s.solo or not s.label.endswith(" flax")]
        print(f"warm: no {store.name}; our cases compile when they are timed", flush=True)
    budget = gpu_memory_gb() - MAIN_GPU_GB
    print(f"warm: {len(all_shards)} shards, {args.jobs} at once, {budget:.0f} GB", flush=True)
    summary = warm.run([s for s in all_shards if s.solo], args.cache, work, 1, budget)
    seeded = seed_autotune(store, autotune_cache_dir(args.cache))
    print(f"warm: {seeded} autotuning results from {store}", flush=True)
    rest = [s for s in all_shards if not s.solo]
    summary = warm.merge(summary, warm.run(rest, args.cache, work, args.jobs, budget))
    source = store.relative_to(ROOT) if store.is_relative_to(ROOT) else store
    summary["autotune_seeded"] = {"from": str(source), "entries": seeded}
    print(f"warm: {summary['wall_s']} s, {len(summary['failed'])} failed", flush=True)
    return summary, work


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if tpu_aot.requested(argv):
        return tpu_aot.main(argv)
    args = parse(argv)
    names = [s for s in args.suites.split(",") if s]
    for name in names:
        if name not in SUITES:
            raise SystemExit(f"unknown suite {name!r}; choose from {list(SUITES)}")
    if "input" in names:  # before the first use of the GPU, which creates the CUDA context
        share_gpu_with_training()
    if not (args.warm_only or args.charts_only or args.keep_cache):
        clear_caches(args.cache)  # compile times are cold ones
    enable_caches(args.cache)
    print(f"device: {device_name()}", flush=True)
    start = time.perf_counter()
    warmed = None
    if not (args.no_warm or args.warm_only or args.charts_only):
        warmed = warm_phase(args, names)
    for name in names:
        settings = Settings.make(args.quick, args.out)
        settings.warm_only = args.warm_only
        if not args.quick:
            for key, value in SAMPLING.get(name, {}).items():
                setattr(settings, key, value)
        if args.charts_only:
            path = Results(name, settings).path
            if path.exists():
                rows = json.loads(path.read_text())["rows"]
                print(chart(path, name, rows, SUITES[name].CHART))
            continue
        kwargs = {}
        if name == "modules":
            kwargs["names"] = tuple(args.modules.split(","))
            kwargs["frameworks"] = tuple(args.frameworks.split(","))
        if name == "train":
            kwargs["models"] = tuple(args.models.split(","))
            kwargs["frameworks"] = tuple(args.frameworks.split(","))
        suite_start = time.perf_counter()
        res = SUITES[name].run(settings, **kwargs)
        res.meta["suite_wall_s"] = round(time.perf_counter() - suite_start, 1)
        if warmed is not None:
            summary, work = warmed
            res.meta["warm"] = summary
            cold = warm.cold_compile_s(work, name)
            for row in res.rows:
                if warm.row_key(row) in cold:
                    row["cached_compile_s"] = row.get("compile_s")
                    row["compile_s"] = cold[warm.row_key(row)]
        res.meta["run_wall_s"] = round(time.perf_counter() - start, 1)
        res.write()
        print(
            f"{name}: {res.path}  chart: {chart(res.path, name, res.rows, SUITES[name].CHART)}",
            flush=True,
        )


if __name__ == "__main__":
    main()
