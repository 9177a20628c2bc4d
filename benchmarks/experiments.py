"""Training-speed experiments in one call: XLA flag sets and BAM's dilated-conv formulation.

`python -m benchmarks.experiments [--quick] [--out DIR]` measures, with `common.time_fn` and
`train.flax_row` (the train suite's step builder and sampling):

* `train`: training-step img/s (batch 256, 224x224, bf16) of resnet50, seresnet50 and
  bam_resnet50 under each XLA flag set in `FLAG_SETS`. XLA reads `XLA_FLAGS` once, when the
  backend starts, so every flag set runs in its own subprocess.
* `train` with `variant="dilated"`: bam_resnet50 with the spatial branch's dilated 3x3 convs as
  plain dilated convolutions (the old formulation), default flags.
* `gate`: the BAM module forward+backward (NHWC bf16, training mode, batch 128) at the four
  ResNet-50 stage shapes, `phase` (the library's polyphase form) against `dilated`.
* `scaling` (`--experiment scaling`, a multi-GPU host): seresnet50's data-parallel step
  (scaling.measure) with `jit` on 1 and 4 devices and `pmap` on 4, under each flag set in
  `SCALING_FLAG_SETS`: ways to overlap or cheapen the step's collectives.

Writes `<out>/experiments.json` (`experiments_scaling.json`; rows as in the suites, plus `experiment`, `flags`, `variant`)
and prints a table. `--quick` is a CPU smoke test with tiny shapes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

FLAG_SETS: dict[str, str] = {
    "default": "",
    "latency_hiding": "--xla_gpu_enable_latency_hiding_scheduler=true",
    "autotune4": "--xla_gpu_autotune_level=4",
    "no_command_buffer": "--xla_gpu_enable_command_buffer=",
}
# "+X" adds X to XLA's default list of what runs inside CUDA graphs.
SCALING_FLAG_SETS: dict[str, str] = {
    "default": "",
    "collectives_in_graphs": "--xla_gpu_enable_command_buffer=+COLLECTIVES",
    "lhs_4mb_buckets": "--xla_gpu_enable_latency_hiding_scheduler=true "
    "--xla_gpu_all_reduce_combine_threshold_bytes=4194304",
    "lhs_4mb_buckets_in_graphs": "--xla_gpu_enable_latency_hiding_scheduler=true "
    "--xla_gpu_all_reduce_combine_threshold_bytes=4194304 "
    "--xla_gpu_enable_command_buffer=+COLLECTIVES",
}
SCALING_CASES = (("jit", 1), ("jit", 4), ("pmap", 4))
MODELS = ("resnet50", "seresnet50", "bam_resnet50")
VARIANTS = ("phase", "dilated")


@contextmanager
def bam_variant(variant: str) -> Iterator[None]:
    """Within the block, BAM's dilated convs run as `variant` ("phase": the library's form)."""
    from flax_attention.layers import bam

    if variant == "phase":
        yield
        return
    original: Callable = bam.phase_conv3x3
    bam.phase_conv3x3 = lambda conv, x: conv(x)  # nnx.Conv with kernel_dilation=d
    try:
        yield
    finally:
        bam.phase_conv3x3 = original


def train_rows(quick: bool, flags: str, extras: bool) -> list[dict[str, Any]]:
    """Training-step rows of `MODELS` (and, with `extras`, bam_resnet50 with dilated convs)."""
    from benchmarks import train
    from benchmarks.__main__ import SAMPLING
    from benchmarks.common import Settings, error_text, format_row

    settings = Settings.make(quick)
    if not quick:
        for key, value in SAMPLING["train"].items():
            setattr(settings, key, value)
    batch = train.QUICK_BATCH if quick else train.BATCH
    image = train.QUICK_IMAGE if quick else train.IMAGE
    cases = [(name, "phase") for name in MODELS]
    if extras:
        cases.append(("bam_resnet50", "dilated"))
    rows = []
    for name, variant in cases:
        row = {"experiment": "train", "name": name, "flags": flags, "variant": variant}
        row.update(batch=batch, shape=[batch, image, image, 3], framework="flax", impl="xla")
        try:
            with bam_variant(variant):
                row.update(train.flax_row(name, "xla", settings, batch, image))
        except Exception as e:
            row["error"] = error_text(e)
        print(format_row(row), variant, flags, flush=True)
        rows.append(row)
    return rows


def gate_rows(quick: bool) -> list[dict[str, Any]]:
    """BAM forward+backward per stage shape, polyphase against dilated convs."""
    import jax.numpy as jnp
    from flax import nnx

    from benchmarks import modules
    from benchmarks.common import (
        Settings,
        copy_bandwidth,
        format_row,
        jax_sync,
        random_inputs,
        time_fn,
    )
    from flax_attention import BAM

    settings = Settings.make(quick)
    gbps = copy_bandwidth(settings)["gbps"]
    rows = []
    for shape in modules.QUICK_SHAPES if quick else modules.SHAPES:
        xs = random_inputs(shape, jnp.bfloat16, settings.inputs, seed=1)
        dys = random_inputs(shape, jnp.bfloat16, settings.inputs, seed=2)
        for variant in VARIANTS:
            module = BAM(shape[-1], 16, rngs=nnx.Rngs(0), dtype=jnp.bfloat16)
            module.train()
            with bam_variant(variant):
                fn, state = modules.flax_fn(module, "fwdbwd")
                inputs = [(state, x, dy) for x, dy in zip(xs, dys, strict=True)]
                timing = time_fn(fn, inputs, jax_sync, settings)
            row = {"experiment": "gate", "name": "bam", "mode": "fwdbwd", "variant": variant}
            row.update(shape=list(shape), batch=shape[0], dtype="bfloat16", flags="")
            row.update(modules._floor(modules.CASES["bam"], "bam", shape, "fwdbwd", gbps))
            row.update(timing.as_dict())
            row.update(modules._fractions(row))
            print(format_row(row), variant, flush=True)
            rows.append(row)
    return rows


def scaling_rows(quick: bool, flags: str) -> list[dict[str, Any]]:
    """seresnet50's parallel step per (form, device count) in `SCALING_CASES` the host has."""
    import jax

    from benchmarks import scaling
    from benchmarks.__main__ import SAMPLING
    from benchmarks.common import Settings, error_text, format_row

    settings = Settings.make(quick)
    if not quick:
        for key, value in SAMPLING["scaling"].items():
            setattr(settings, key, value)
    batch = scaling.QUICK_BATCH if quick else scaling.PER_DEVICE_BATCH
    image = scaling.QUICK_IMAGE if quick else 224
    rows = []
    for form, n in (c for c in SCALING_CASES if c[1] <= jax.device_count()):
        row = {"experiment": "scaling", "name": "seresnet50", "flags": flags, "variant": form}
        row.update(impl=form, n_devices=n, batch=batch, shape=[batch, image, image, 3])
        try:
            compile_s, timing = scaling.measure("seresnet50", form, n, settings, batch, image)
            row.update(timing.as_dict(), compile_s=round(compile_s, 2))
            row["img_per_s_per_device"] = round(batch / timing.median_ms * 1e3, 1)
            row["img_per_s"] = round(row["img_per_s_per_device"] * n, 1)
        except Exception as e:
            row["error"] = error_text(e)
        print(format_row(row), flags, flush=True)
        rows.append(row)
    return rows


def child(args: argparse.Namespace) -> None:
    """One flag set, in this process (XLA_FLAGS already set by the parent)."""
    from benchmarks.common import device_name

    flags = os.environ.get("XLA_FLAGS", "")
    if args.experiment == "scaling":
        rows = scaling_rows(args.quick, flags)
    else:
        rows = gate_rows(args.quick) if args.extras else []
        rows += train_rows(args.quick, flags, args.extras)
    rows = [{**row, "device": device_name()} for row in rows]
    args.child_out.write_text(json.dumps(rows, indent=1) + "\n")


def run_flag_set(name: str, args: argparse.Namespace, timeout_s: float) -> list[dict[str, Any]]:
    """Run one flag set in a subprocess; its rows, or one error row."""
    out = args.out / f"rows_{name}.json"
    flags = flag_sets(args.experiment)[name]
    cmd = [sys.executable, "-m", "benchmarks.experiments", "--child-out", str(out)]
    cmd += ["--experiment", args.experiment] + (["--quick"] if args.quick else [])
    cmd += ["--extras"] if name == "default" else []
    env = {**os.environ, "XLA_FLAGS": flags}
    try:
        proc = subprocess.run(cmd, env=env, timeout=timeout_s, check=False)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        rc = "timeout"
    if out.exists():
        rows = json.loads(out.read_text())
        out.unlink()
    else:
        rows = [{"experiment": args.experiment, "flags": flags, "error": f"exit {rc}"}]
    return [{**row, "flag_set": name} for row in rows]


def summary(rows: list[dict[str, Any]]) -> str:
    lines = ["experiment  name  flag_set  variant  shape  median_ms  img/s  bw_frac"]
    for r in rows:
        if "error" in r:
            lines.append(f"{r.get('flag_set')} {r.get('name', '')} ERROR {r['error']}")
            continue
        lines.append(
            f"{r['experiment']:6s} {r['name']:14s} {r['flag_set']:18s} {r['variant']:8s} "
            f"{r['shape']!s:22s} {r['median_ms']:9.3f} {r.get('img_per_s', '')!s:>8} "
            f"{r.get('bw_frac', '')}"
        )
    return "\n".join(lines)


def stem(experiment: str) -> str:
    return "experiments" if experiment == "train" else f"experiments_{experiment}"


def flag_sets(experiment: str) -> dict[str, str]:
    return SCALING_FLAG_SETS if experiment == "scaling" else FLAG_SETS


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.experiments", description=__doc__)
    p.add_argument("--quick", action="store_true", help="tiny shapes, few samples (CPU smoke)")
    p.add_argument("--experiment", choices=("train", "scaling"), default="train")
    p.add_argument("--out", type=Path, default=Path("."), help="folder for experiments.json")
    p.add_argument("--flag-sets", help="comma-separated names (default: all of the experiment's)")
    p.add_argument("--budget-s", type=float, default=500.0, help="stop starting flag sets after")
    p.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--extras", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    if args.child_out is not None:
        child(args)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    rows: list[dict[str, Any]] = []
    from benchmarks.common import versions

    sets = flag_sets(args.experiment)
    doc: dict[str, Any] = {"suite": "experiments", "versions": versions(), "flag_sets": sets}
    doc["rows"] = rows
    for name in (args.flag_sets or ",".join(sets)).split(","):
        left = args.budget_s - (time.perf_counter() - t0)
        if left < 30:
            rows.append({"flag_set": name, "experiment": "train", "error": "not run: budget"})
            continue
        rows += run_flag_set(name, args, left)
        doc["time_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        (args.out / f"{stem(args.experiment)}.json").write_text(json.dumps(doc, indent=1) + "\n")
    print(summary(rows), flush=True)


if __name__ == "__main__":
    main()
