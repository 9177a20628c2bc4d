"""Compile the one-GPU suites' cases in parallel worker processes into persistent caches.

Compilation dominates the suites' wall time: on an H100 torch.compile's first training step takes
50-135 s per model and ours 14-125 s, many minutes in a row before anything is timed. Compiles
spread over CPU cores; timing must not share the GPU. So `python -m benchmarks` first runs shards
(one suite restricted to one model or module and one framework) as `--warm-only` workers, several
at a time: each case compiles into the caches of `common.enable_caches` and runs once, nothing is
timed. The suites are then timed in one process, where a compile is a cache load.

Not warmed: eager PyTorch (nothing to compile); the passes suite (its Mosaic GPU kernels compile
in every process anyway, and its XLA passes compile in under a second); and our resnet50 step,
whose compile time is a target: the timed process compiles it cold, on an otherwise idle machine.
The workers' rows carry the other cold compile times; `cold_compile_s` finds them.
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

# Rough cold-compile seconds per shard on an H100, only to start the longest shards first.
EST_S = {
    ("train", "torch.compile"): 100,
    ("train", "flax"): 40,
    ("modules", "torch.compile"): 80,
    ("modules", "flax"): 80,
}
HEAVY = {"epsanet50_small": 2.0, "psa": 1.4}  # their grouped convolutions compile longest
GPU_GB = {("train", "torch.compile"): 15.0}  # a step runs at batch 256; ours only compiles
NOT_WARMED = {("train", "resnet50", "flax")}


@dataclass(frozen=True)
class Shard:
    """One worker: `python -m benchmarks --warm-only` with `args`, needing about `gpu_gb`."""

    label: str
    args: tuple[str, ...]
    gpu_gb: float
    est_s: float


def shards(
    suites: list[str],
    models: list[str],
    modules: list[str],
    frameworks: list[str],
    train_impls: str,
) -> list[Shard]:
    """The train and modules suites' shards, longest first."""
    items = {"train": models, "modules": modules}
    out = []
    for suite in (s for s in ("train", "modules") if s in suites):
        for fw in (f for f in frameworks if f != "torch"):
            for item in items[suite]:
                if (suite, item, fw) in NOT_WARMED:
                    continue
                args = ("--suites", suite, f"--{'models' if suite == 'train' else suite}", item)
                args += ("--frameworks", fw, "--train-impls", train_impls)
                est = EST_S.get((suite, fw), 30) * HEAVY.get(item, 1.0)
                out.append(Shard(f"{suite} {item} {fw}", args, GPU_GB.get((suite, fw), 4.0), est))
    return sorted(out, key=lambda s: -s.est_s)


def run(shard_list: list[Shard], cache_dir: Path, out_dir: Path, jobs: int, gpu_gb: float) -> dict:
    """Run the shards in order, at most `jobs` at once within `gpu_gb` of GPU memory; returns a
    summary (wall time, jobs, each shard's seconds, the failed ones with their log tails).

    The first `jobs // 2` shards, the longest, decide the phase's length: the others run at a
    lower CPU priority (nice 10) so that they take only the cores those leave idle."""
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["TORCHINDUCTOR_COMPILE_THREADS"] = str(max(1, (os.cpu_count() or 2) // jobs))
    start = time.perf_counter()
    pending = list(shard_list)
    running: dict[subprocess.Popen, tuple[Shard, Path, float]] = {}
    seconds, failed = {}, []
    while pending or running:
        used = sum(s.gpu_gb for s, _, _ in running.values())
        while (
            pending and len(running) < jobs and (not running or used + pending[0].gpu_gb <= gpu_gb)
        ):
            shard = pending.pop(0)
            work = out_dir / f"shard{len(seconds) + len(running):03d}"
            work.mkdir(parents=True, exist_ok=True)
            cmd = [sys.executable, "-m", "benchmarks", "--warm-only", "--cache", str(cache_dir)]
            cmd += ["--out", str(work), *shard.args]
            log = (work / "log.txt").open("w")
            lead = len(shard_list) - len(pending) <= max(1, jobs // 2)
            proc = subprocess.Popen(
                cmd,
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=None if lead else lambda: os.nice(10),
            )
            running[proc] = (shard, work, time.perf_counter())
            used += shard.gpu_gb
        time.sleep(0.5)
        for proc in [p for p in running if p.poll() is not None]:
            shard, work, t0 = running.pop(proc)
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
    return {
        "wall_s": round(time.perf_counter() - start, 1),
        "jobs": jobs,
        "gpu_gb": round(gpu_gb, 1),
        "shard_s": seconds,
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
