"""Where a training step's device time goes: the train suite's step, profiled, by kernel kind.

For each model: build and compile the train suite's step (`benchmarks.train.flax_step`), run a
few steps under `jax.profiler.trace`, read the trace back with `jax.profiler.ProfileData`, and
join each device kernel to its HLO instruction in the compiled module. Every instruction is put
in one category (convolution / matmul library calls, reduction fusions, elementwise fusions,
copies, collectives, other), with its time per step and the bytes its operands and result
occupy, so that memory-bound categories can be read against the copy bandwidth.

`python -m benchmarks.lab.profile_step [--models resnet50,...] [--steps 5] [--top 25]
[--quick] [--save-hlo] [--out DIR]` writes `<out>/profile_step.json` (per model: categories and
the `--top` costliest instructions, every one with `--top 0`); `<out>` is
benchmarks/results/<device> unless given. It adds `--xla_gpu_enable_command_buffer=` to
`XLA_FLAGS` (unless they set that flag) before JAX starts its backends, so that the trace
shows each kernel rather than the CUDA graphs XLA would launch them in.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
from pathlib import Path

import jax

from benchmarks import train
from benchmarks.device import device_slug
from benchmarks.lab.profiling import profile_calls
from benchmarks.results import error_text
from benchmarks.settings import RESULTS


def profile(name: str, batch: int, image: int, steps: int, top: int, hlo_dir: Path | None) -> dict:
    step = train.flax_step(name, batch, image, inputs=2)
    hlo_text = step.compiled.as_text()
    if hlo_dir is not None:
        with gzip.open(hlo_dir / f"{name}.hlo.txt.gz", "wt") as f:
            f.write(hlo_text)
    prof = profile_calls(lambda i: step(*step.data[i % 2]), steps, hlo_text)
    return {
        "name": name,
        "batch": batch,
        "wall_ms_per_step_traced": prof["wall_ms_traced"],
        "device_ms_per_step": prof["device_ms"],
        "kernels_per_step": prof["kernels"],
        "categories": prof["categories"],
        "top": prof["ops"][:top] if top else prof["ops"],
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(train.MODELS), help="comma-separated models")
    p.add_argument("--steps", type=int, default=5, help="steps traced per model")
    p.add_argument("--top", type=int, default=25, help="instructions kept per model (0: all)")
    p.add_argument("--quick", action="store_true", help="tiny shapes (CPU smoke)")
    p.add_argument("--out", type=Path, help="folder for profile_step.json")
    p.add_argument("--save-hlo", action="store_true", help="also write <out>/<model>.hlo.txt.gz")
    args = p.parse_args(argv)
    flags = os.environ.get("XLA_FLAGS", "")
    if "--xla_gpu_enable_command_buffer" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_gpu_enable_command_buffer=".strip()
    if args.top < 0:
        p.error(f"--top must be >= 0 (0 keeps every instruction), got {args.top}")
    args.out = args.out or RESULTS / device_slug(args.quick)
    args.out.mkdir(parents=True, exist_ok=True)
    batch = train.QUICK_BATCH if args.quick else train.BATCH
    image = train.QUICK_IMAGE if args.quick else train.IMAGE
    rows = []
    for name in args.models.split(","):
        try:
            hlo_dir = args.out if args.save_hlo else None
            row = profile(name, batch, image, args.steps, args.top, hlo_dir)
        except Exception as e:
            row = {"name": name, "error": error_text(e)}
        rows.append(row)
        print(f"{name}: wall {row.get('wall_ms_per_step_traced')} ms/step", flush=True)
        for cat, v in row.get("categories", {}).items():
            print(
                f"  {cat:12s} {v['ms']:8.3f} ms {v['gb']:8.3f} GB {v['tb_per_s']} TB/s", flush=True
            )
    meta = {"device": jax.devices()[0].device_kind, "jax": jax.__version__}
    (args.out / "profile_step.json").write_text(json.dumps({**meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
