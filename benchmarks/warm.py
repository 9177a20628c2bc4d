"""Compile every case of the one-GPU suites in parallel worker processes into persistent caches.

Compilation dominates the suites' wall time: on an H100 torch.compile's first training step takes
57-114 s per model and ours 11-86 s, over 8 minutes in a row before anything is timed. Compiles
spread over CPU cores; timing must not share the GPU. So `python -m benchmarks` first runs shards
(one suite restricted to one model, module or pass and one framework) as `--warm-only` workers,
several at a time: each case compiles into the caches of `common.enable_caches` and runs once,
nothing is timed. The suites are then timed in one process, where a compile is a cache load.

The workers' rows carry the cold compile times; `cold_compile_s` finds them for the timed rows.
resnet50's own step runs alone first: its compile time is a target, measured on an idle machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.common import ROOT

GiB = 2**30


@dataclass(frozen=True)
class Shard:
    """One worker: `python -m benchmarks --warm-only` with `args`, needing about `gpu_gb`."""

    label: str
    args: tuple[str, ...]
    gpu_gb: float
    solo: bool = False  # run alone, before the others


def shards(
    suites: list[str],
    models: list[str],
    modules: list[str],
    passes: list[str],
    frameworks: list[str],
    train_impls: str,
) -> list[Shard]:
    """The suites' shards, longest first. Eager PyTorch compiles nothing and is not warmed."""
    out = []
    compiled = [f for f in frameworks if f != "torch"]
    if "train" in suites:
        for fw in sorted(compiled, reverse=True):  # torch.compile's are the longest
            for model in models:
                args = ("--suites", "train", "--models", model, "--frameworks", fw)
                args += ("--train-impls", train_impls)
                # ours compiles without running; a torch.compile step runs at batch 256
                gb = 4.0 if fw == "flax" else 15.0
                out.append(
                    Shard(f"train {model} {fw}", args, gb, fw == "flax" and model == "resnet50")
                )
    if "modules" in suites:
        for fw in sorted(compiled, reverse=True):
            for name in modules:
                args = ("--suites", "modules", "--modules", name, "--frameworks", fw)
                out.append(Shard(f"modules {name} {fw}", args, 4.0))
    if "passes" in suites:
        for name in passes:
            out.append(Shard(f"passes {name}", ("--suites", "passes", "--passes", name), 3.0))
    return out


def run(shard_list: list[Shard], cache_dir: Path, out_dir: Path, jobs: int, gpu_gb: float) -> dict:
    """Run the shards, at most `jobs` at once within `gpu_gb` of GPU memory; returns a summary
    (wall time, jobs, the failed shards with their log tails) for the results' meta."""
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["TORCHINDUCTOR_COMPILE_THREADS"] = str(max(1, (os.cpu_count() or 2) // jobs))
    start = time.perf_counter()
    pending = sorted(shard_list, key=lambda s: not s.solo)
    running: dict[subprocess.Popen, tuple[Shard, Path, float]] = {}
    failed = []
    done = 0

    def launch(i: int, shard: Shard) -> None:
        work = out_dir / f"shard{i:03d}"
        work.mkdir(parents=True, exist_ok=True)
        cmd = [
            sys.executable,
            "-m",
            "benchmarks",
            "--warm-only",
            "--no-warm",
            "--cache",
            str(cache_dir),
            "--out",
            str(work),
            *shard.args,
        ]
        log = (work / "log.txt").open("w")
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        running[proc] = (shard, work, time.perf_counter())

    index = 0
    while pending or running:
        used = sum(s.gpu_gb for s, _, _ in running.values())
        solo_running = any(s.solo for s, _, _ in running.values())
        while pending and len(running) < jobs and not solo_running:
            shard = pending[0]
            if running and (shard.solo or used + shard.gpu_gb > gpu_gb):
                break
            pending.pop(0)
            launch(index, shard)
            index += 1
            used += shard.gpu_gb
            solo_running = shard.solo
        time.sleep(0.5)
        for proc in [p for p in running if p.poll() is not None]:
            shard, work, t0 = running.pop(proc)
            done += 1
            status = "ok" if proc.returncode == 0 else f"exit {proc.returncode}"
            print(
                f"  warm {done}/{len(shard_list)} {shard.label}: {status} "
                f"({time.perf_counter() - t0:.0f} s)",
                flush=True,
            )
            if proc.returncode != 0:
                tail = (work / "log.txt").read_text()[-2000:]
                failed.append({"shard": shard.label, "log_tail": tail})
    return {
        "wall_s": round(time.perf_counter() - start, 1),
        "jobs": jobs,
        "gpu_gb": gpu_gb,
        "shards": len(shard_list),
        "failed": failed,
    }


def cold_compile_s(out_dir: Path, suite: str) -> dict[tuple, float]:
    """Cold compile times from the workers' rows of `suite`, keyed by `row_key`."""
    found = {}
    for path in sorted(out_dir.glob(f"shard*/*/{suite}.json")):
        for row in json.loads(path.read_text())["rows"]:
            if row.get("compile_s") is not None:
                found[row_key(row)] = row["compile_s"]
    return found


def row_key(row: dict) -> tuple:
    return tuple(str(row.get(k)) for k in ("name", "framework", "impl", "mode", "shape"))
