"""Compile the one-GPU suites' cases in parallel worker processes into persistent caches.

Compilation dominates the suites' wall time: on an H100 torch.compile's first training step takes
50-135 s per model and ours 14-125 s, many minutes in a row before anything is timed. Compiles
spread over CPU cores; timing must not share the GPU. So `python -m benchmarks` first runs shards
(one suite restricted to one model or module and one framework) as `--warm-only` workers, several
at a time: each case compiles into the caches of `caches.enable_caches` and runs once, nothing is
timed. The suites are then timed in one process, where a compile is a cache load. Workers
start longest first, by the seconds each shard took in the previous run (the suites' JSON
records them, `warm.shard_s`); shards without a recorded time start first.

Not warmed: eager PyTorch (nothing to compile).

XLA autotunes convolutions by timing them on the GPU, so a compile that shares the GPU can pick
slower kernels (two of four parallel runs on 2026-11-22 gave seresnet50 a 6-7% slower step).
Our resnet50 step therefore compiles first, alone and cold (its compile time is a target); then
the autotuning results recorded on an idle GPU (autotune.py) are copied into the cache, so the
workers look their fusions up. `--jobs 1` compiles everything alone. The workers' rows carry the
compile times (`cold_compile_s`): cold in the caches, but with the recorded autotuning.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from benchmarks.settings import ROOT

GPU_GB = {("train", "torch.compile"): 15.0}  # a step runs at batch 256; ours only compiles
SOLO = {"train resnet50 flax"}  # compiled first, alone: see the module docstring


@dataclass(frozen=True)
class Shard:
    """One worker: `python -m benchmarks --warm-only` with `args`, needing about `gpu_gb`."""

    label: str
    args: tuple[str, ...]
    gpu_gb: float
    est_s: float | None  # its seconds in the last run's warm phase; None: not recorded
    solo: bool = False


def shards(
    suites: list[str],
    models: list[str],
    modules: list[str],
    frameworks: list[str],
    seconds: dict[str, float],
) -> list[Shard]:
    """The train and modules suites' shards: the solo one, then those without a time in
    `seconds` (`recorded_seconds`: a first run, a new case; they may be the longest), then the
    rest longest first."""
    items = {"train": models, "modules": modules}
    out = []
    for suite in (s for s in ("train", "modules") if s in suites):
        for fw in (f for f in frameworks if f != "torch"):
            for item in items[suite]:
                args = ("--suites", suite, f"--{'models' if suite == 'train' else suite}", item)
                args += ("--frameworks", fw)
                label = f"{suite} {item} {fw}"
                gb = GPU_GB.get((suite, fw), 4.0)
                out.append(Shard(label, args, gb, seconds.get(label), label in SOLO))
    return sorted(out, key=lambda s: (not s.solo, s.est_s is not None, -(s.est_s or 0.0)))


def recorded_seconds(results: Path) -> dict[str, float]:
    """Each shard's seconds in the last warm phase whose suites wrote JSON to the folder
    `results` (their `warm.shard_s`); empty when there is none."""
    seconds: dict[str, float] = {}
    for path in sorted(results.glob("*.json")):
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        seconds.update(doc.get("warm", {}).get("shard_s", {}))
    return seconds


def run(shard_list: list[Shard], cache_dir: Path, out_dir: Path, jobs: int, gpu_gb: float) -> dict:
    """Run the shards in order, at most `jobs` at once within `gpu_gb` of GPU memory; returns a
    summary (wall time, jobs, the CPUs' busy fraction, each shard's seconds, the failed ones with
    their log tails)."""
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["TORCHINDUCTOR_COMPILE_THREADS"] = str(max(1, (os.cpu_count() or 2) // jobs))
    start, cpu_start = time.perf_counter(), cpu_times()
    pending = list(shard_list)
    running: dict[subprocess.Popen, tuple[Shard, Path, float, IO]] = {}
    seconds, failed = {}, []
    try:
        while pending or running:
            used = sum(shard.gpu_gb for shard, *_ in running.values())
            while (
                pending
                and len(running) < jobs
                and (not running or used + pending[0].gpu_gb <= gpu_gb)
            ):
                shard = pending.pop(0)
                running.update(_start(shard, cache_dir, out_dir, env))
                used += shard.gpu_gb
            time.sleep(0.5)
            for proc in [p for p in running if p.poll() is not None]:
                shard, work, t0, log = running.pop(proc)
                log.close()
                seconds[shard.label] = round(time.perf_counter() - t0, 1)
                status = "ok" if proc.returncode == 0 else f"exit {proc.returncode}"
                print(
                    f"  warm {len(seconds)}/{len(shard_list)} {shard.label}: {status} "
                    f"({seconds[shard.label]:.0f} s)",
                    flush=True,
                )
                if proc.returncode != 0:
                    failed.append(
                        {"shard": shard.label, "log_tail": (work / "log.txt").read_text()[-2000:]}
                    )
    finally:  # an error or Ctrl-C: no worker outlives the run, no log stays open
        stop_processes(running)
        for *_, log in running.values():
            log.close()
    return {
        "wall_s": round(time.perf_counter() - start, 1),
        "jobs": jobs,
        "cpu_busy_frac": cpu_busy_frac(cpu_start, cpu_times()),
        "gpu_gb": round(gpu_gb, 1),
        "shard_s": seconds,
        "failed": failed,
    }


def _start(
    shard: Shard, cache_dir: Path, out_dir: Path, env: dict[str, str]
) -> dict[subprocess.Popen, tuple[Shard, Path, float, IO]]:
    """Start `shard`'s worker, its output into `<out_dir>/<label>/log.txt`:
    {process: (shard, its folder, start time, its open log)}."""
    work = out_dir / re.sub(r"[^A-Za-z0-9.]+", "-", shard.label)
    work.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "benchmarks", "--warm-only", "--cache", str(cache_dir)]
    cmd += ["--out", str(work), *shard.args]
    log = (work / "log.txt").open("w")
    try:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    except BaseException:
        log.close()
        raise
    return {proc: (shard, work, time.perf_counter(), log)}


def merge(first: dict, then: dict) -> dict:
    """One summary of two `run`s made one after the other."""
    return {
        **then,
        "wall_s": round(first["wall_s"] + then["wall_s"], 1),
        "shard_s": {**first["shard_s"], **then["shard_s"]},
        "failed": first["failed"] + then["failed"],
    }


def cpu_times() -> list[int] | None:
    """The machine's aggregate CPU time counters (Linux /proc/stat), None elsewhere."""
    try:
        return [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    except (OSError, ValueError):
        return None


def cpu_busy_frac(start: list[int] | None, end: list[int] | None) -> float | None:
    """Fraction of CPU time not idle (idle + iowait) between two `cpu_times` readings."""
    if start is None or end is None:
        return None
    delta = [b - a for a, b in zip(start, end, strict=True)]
    return round(1 - (delta[3] + delta[4]) / max(1, sum(delta)), 3)


def cold_compile_s(out_dir: Path, suite: str) -> dict[tuple, float]:
    """Cold compile times from the workers' rows of `suite`, keyed by `row_key`."""
    found = {}
    for path in sorted(out_dir.glob(f"*/*/{suite}.json")):
        for row in json.loads(path.read_text())["rows"]:
            if row.get("compile_s") is not None:
                found[row_key(row)] = row["compile_s"]
    return found


def row_key(row: dict) -> tuple:
    keys = ("name", "framework", "spatial_conv", "mode", "shape")
    return tuple(str(row.get(k)) for k in keys)


def stop_processes(processes: Iterable[subprocess.Popen], grace_s: float = 5.0) -> None:
    """Terminate the processes still running, give them `grace_s` seconds to exit, then kill
    those left; returns once every one has exited."""
    running = [p for p in processes if p.poll() is None]
    for proc in running:
        proc.terminate()
    deadline = time.monotonic() + grace_s
    for proc in running:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
