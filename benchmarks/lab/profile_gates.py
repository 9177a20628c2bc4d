"""Where each attention gate's time goes: the modules suite's forward+backward, kernel by kernel.

For each gate x stage shape (the modules suite's SHAPES, batch 128, bfloat16, training mode) x
row of the modules suite (CBAM's and BAM's per `spatial_conv`), compile forward+backward
exactly as `benchmarks.modules` times it (`flax_fn(module,
"fwdbwd")`), trace a few calls and join every device kernel to its HLO instruction
(`benchmarks.lab.profiling.profile_calls`). Each row holds kernel launches, device ms and wall ms
per call, time by category, and every instruction that ran: its ms, launches, bytes, category,
what it computes (custom-call target such as a cuDNN convolution's forward / backward-filter /
backward-input, or a fusion's kind and fused ops), the JAX op it came from and its HLO text.

Cases are compiled `--jobs` at a time, then each of them is profiled alone before the next
chunk compiles (the JSON grows chunk by chunk).
`python -m benchmarks.lab.profile_gates [--gates se,cbam,bam,psa] [--spatial-convs conv,...]
[--steps 5] [--jobs 4] [--save-hlo] [--quick] [--out DIR]` writes `<out>/profile_gates.json`
(rewritten after every profiled case) and prints one line per case; `<out>` is
benchmarks/results/<device> unless given. `--spatial-convs` keeps CBAM's and BAM's rows of
those formulations (SE and PSA have one row each).
`--quick` uses the modules suite's QUICK_SHAPES (a CPU smoke run). On a GPU run it with
`XLA_FLAGS=--xla_gpu_enable_command_buffer=` so that the profiler sees kernels, not CUDA graphs.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from benchmarks import modules
from benchmarks.device import device_slug
from benchmarks.lab.profiling import profile_calls
from benchmarks.results import error_text
from benchmarks.settings import RESULTS
from benchmarks.timing import random_inputs

INPUTS = 2  # input sets rotated through, as the modules suite does (with more)
TOP_PRINTED = 3


def compile_case(name: str, kw: dict[str, str], shape: tuple[int, ...]) -> tuple[Any, Any, float]:
    """One gate's forward+backward at NHWC `shape` (bfloat16, training mode) built with `kw`
    (`modules.variants`), compiled as the modules suite runs it; returns (executable, module
    state, compile seconds)."""
    module = modules.CASES[name].flax(shape[-1], rngs=nnx.Rngs(0), dtype=jnp.bfloat16, **kw)
    module.train()
    fn, state = modules.flax_fn(module, "fwdbwd")
    spec = jax.ShapeDtypeStruct(shape, jnp.bfloat16)
    t0 = time.perf_counter()
    compiled = fn.lower(state, spec, spec).compile()
    return compiled, state, time.perf_counter() - t0


def hlo_name(name: str, kw: dict[str, str], shape: tuple[int, ...]) -> str:
    """File name of a case's optimized HLO under <out>/hlo/."""
    variant = "".join(f"-{form}" for form in kw.values())
    return f"{name}-{'x'.join(map(str, shape[1:]))}{variant}.hlo.txt.gz"


def profile_case(compiled: Any, state: Any, shape: tuple[int, ...], steps: int) -> dict:
    """Profile one compiled case on random inputs; returns the row's measurements."""
    xs = random_inputs(shape, jnp.bfloat16, INPUTS, seed=1)
    dys = random_inputs(shape, jnp.bfloat16, INPUTS, seed=2)
    prof = profile_calls(
        lambda i: compiled(state, xs[i % INPUTS], dys[i % INPUTS]), steps, compiled.as_text()
    )
    return {"min_bytes": modules.PASSES["fwdbwd"] * 2 * math.prod(shape), **prof}


def summary_line(row: dict) -> str:
    """One printed line per case: launches, device and wall ms, the costliest instructions."""
    head = f"{row['name']:5s} {'x'.join(map(str, row['shape'][1:])):11s}"
    head += f" {row.get('spatial_conv', ''):7s}"
    if "error" in row:
        return f"{head} error: {row['error'][:100]}"
    top = "; ".join(f"{op['op']} {op['ms']:.3f}" for op in row["ops"][:TOP_PRINTED])
    return (
        f"{head} {row['kernels']:6.1f} kernels {row['device_ms']:8.3f} ms device "
        f"{row['wall_ms']:8.3f} ms wall | {top}"
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gates", default=",".join(modules.CASES), help="comma-separated gates")
    p.add_argument(
        "--spatial-convs", default="", help="CBAM's and BAM's formulations (default: all rows)"
    )
    p.add_argument("--steps", type=int, default=5, help="calls traced per case")
    p.add_argument("--quick", action="store_true", help="tiny shapes (CPU smoke)")
    p.add_argument("--out", type=Path, help="folder for profile_gates.json")
    p.add_argument("--jobs", type=int, default=4, help="cases compiled at once, then profiled")
    p.add_argument("--save-hlo", action="store_true", help="also write <out>/hlo/*.hlo.txt.gz")
    args = p.parse_args(argv)
    out = args.out or RESULTS / device_slug(args.quick)
    out.mkdir(parents=True, exist_ok=True)
    shapes = modules.QUICK_SHAPES if args.quick else modules.SHAPES
    wanted = [s for s in args.spatial_convs.split(",") if s]
    meta = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "steps": args.steps}
    meta["xla_flags"] = os.environ.get("XLA_FLAGS", "")
    cases = [
        (name, kw, tuple(shape))
        for name in args.gates.split(",")
        for shape in shapes
        for kw in modules.variants(modules.CASES[name])
        if not wanted or kw.get("spatial_conv") in (None, *wanted)
    ]
    # Cases are compiled `--jobs` at a time, in parallel, then profiled one by one: no
    # compilation (GPU autotuning runs kernels) overlaps a trace, and a run cut short keeps the
    # rows of every finished chunk.
    rows = []
    with ThreadPoolExecutor(args.jobs) as pool:
        for first in range(0, len(cases), args.jobs):
            chunk = cases[first : first + args.jobs]
            compiling = [pool.submit(compile_case, *case) for case in chunk]
            wait(compiling)
            for (name, kw, shape), future in zip(chunk, compiling, strict=True):
                rows.append(profile_row(name, kw, shape, future, args, out))
                print(summary_line(rows[-1]), flush=True)
                (out / "profile_gates.json").write_text(
                    json.dumps({**meta, "rows": rows}, indent=1)
                )


def profile_row(
    name: str,
    kw: dict[str, str],
    shape: tuple[int, ...],
    future: Any,
    args: argparse.Namespace,
    out: Path,
) -> dict:
    """The row of one case from its compilation (`future`): profile, optional HLO file, or the
    error that stopped it."""
    row = {"name": name, **kw, "shape": list(shape), "dtype": "bfloat16"}
    try:
        compiled, state, compile_s = future.result()
        row["compile_s"] = round(compile_s, 2)
        row.update(profile_case(compiled, state, shape, args.steps))
        if args.save_hlo:
            (out / "hlo").mkdir(exist_ok=True)
            with gzip.open(out / "hlo" / hlo_name(name, kw, shape), "wt") as f:
                f.write(compiled.as_text())
    except Exception as e:  # a case that fails to compile is a result too
        row["error"] = error_text(e)
    return row


if __name__ == "__main__":
    main()
