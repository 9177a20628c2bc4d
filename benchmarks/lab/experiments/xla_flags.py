"""The train suite's step under other XLA GPU flags: do any of them make it faster?

Each variant is a set of `XLA_FLAGS` (CUDA graphs through XLA's command buffers at other
minimum sizes or off, cuBLAS instead of Triton for the matrix products, ...). Every
(round, variant) runs in a process of its own, so the flags apply from the first compile; the
variants alternate round by round, and all of them share one persistent compilation cache
(seeded with this device's recorded autotuning, benchmarks/caches.py), so from the second
round on a process loads its programs instead of compiling them. The step is the train suite's
(`benchmarks.train.flax_step`: bf16, batch 256, synthetic data on the device), its median
img/s over `Settings` samples.

`python -m benchmarks.lab.experiments.xla_flags [--quick] [--models resnet50,...]
[--rounds 2] [--out DIR]` writes `<out>/xla_flags.json` (by default
benchmarks/lab/experiments/results/<device>/). A variant whose flags XLA refuses gets the
process's last error line instead of a figure.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.device import device_slug
from benchmarks.lab.experiments import write_record
from benchmarks.settings import ROOT, Settings

VARIANTS = {
    "default": "",
    "graphs_from_1": "--xla_gpu_graph_min_graph_size=1",
    "graphs_off": "--xla_gpu_enable_command_buffer=",
    "cublas_gemms": "--xla_gpu_enable_triton_gemm=false",
}
MODELS = ("resnet50",)


def child(models: list[str], quick: bool, cache: Path) -> list[dict]:
    """This process's rows: each model's step compiled under this process's XLA_FLAGS."""
    from benchmarks import train
    from benchmarks.caches import (
        AUTOTUNE_STORE,
        autotune_cache_dir,
        autotune_store_path,
        enable_caches,
        seed_autotune,
    )

    enable_caches(cache)
    seed_autotune(autotune_store_path(AUTOTUNE_STORE, device_slug()), autotune_cache_dir(cache))
    settings = Settings.make(quick)
    batch = train.QUICK_BATCH if quick else train.BATCH
    image = train.QUICK_IMAGE if quick else train.IMAGE
    return [{"model": m, **train.flax_row(m, settings, batch, image)} for m in models]


def run_variant(flags: str, models: list[str], quick: bool, cache: Path) -> list[dict] | str:
    """The rows of one child process run with `flags`, or its last error line."""
    env = {**os.environ, "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip()}
    cmd = [sys.executable, "-m", "benchmarks.lab.experiments.xla_flags", "--child"]
    cmd += ["--models", ",".join(models), "--cache", str(cache)] + (["--quick"] if quick else [])
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines() or ["no output"]
        return lines[-1][:300]
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.lab.experiments.xla_flags")
    parser.add_argument("--quick", action="store_true", help="CPU smoke: tiny shapes")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--variants", default=",".join(VARIANTS), help="names of VARIANTS")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--cache", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    models = args.models.split(",")
    if args.child:
        print(json.dumps(child(models, args.quick, args.cache)))
        return
    names = args.variants.split(",")
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; choose among {list(VARIANTS)}")
    rows = []
    with tempfile.TemporaryDirectory() as cache:
        for round_ in range(args.rounds):
            for name in names:
                start = time.perf_counter()
                result = run_variant(VARIANTS[name], models, args.quick, Path(cache))
                base = {"variant": name, "xla_flags": VARIANTS[name], "round": round_}
                base["wall_s"] = round(time.perf_counter() - start, 1)
                if isinstance(result, str):
                    rows.append({**base, "error": result})
                else:
                    rows += [{**base, **row} for row in result]
                print(json.dumps(rows[-1]), flush=True)
    write_record("xla_flags", rows, args.out, args.quick)


if __name__ == "__main__":
    main()
