"""Where each attention gate's time goes: the modules suite's forward+backward, kernel by kernel.

For each gate x stage shape (the modules suite's SHAPES, batch 128, bfloat16, training mode) x
impl, compile forward+backward exactly as `benchmarks.modules` times it (`flax_fn(module,
"fwdbwd")`), trace a few calls and join every device kernel to its HLO instruction
(`benchmarks.profiling.profile_calls`). Each row holds kernel launches, device ms and wall ms
per call, time by category, and every instruction that ran: its ms, launches, bytes, category,
what it computes (custom-call target such as a cuDNN convolution's forward / backward-filter /
backward-input, or a fusion's kind and fused ops), the JAX op it came from and its HLO text.

`python -m benchmarks.profile_gates [--gates se,cbam,bam,psa] [--impls xla,...] [--steps 5]
[--quick] [--out DIR]` writes `<out>/profile_gates.json` (rewritten after every case) and prints
one line per case; `<out>` is benchmarks/results/<device> unless given. `--quick` uses the
modules suite's QUICK_SHAPES (a CPU smoke run). On a GPU run it with
`XLA_FLAGS=--xla_gpu_enable_command_buffer=` so that the profiler sees kernels, not CUDA graphs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from benchmarks import modules
from benchmarks.common import RESULTS, device_slug, error_text, random_inputs
from benchmarks.profiling import profile_calls

INPUTS = 2  # input sets rotated through, as the modules suite does (with more)
TOP_PRINTED = 3


def profile_case(name: str, impl: str, shape: tuple[int, ...], steps: int) -> dict:
    """Compile one gate's forward+backward at NHWC `shape` (bfloat16, training mode) and
    profile it; returns the row (without the case's name, impl and shape)."""
    module = modules.CASES[name].flax(shape[-1], impl=impl, rngs=nnx.Rngs(0), dtype=jnp.bfloat16)
    module.train()
    fn, state = modules.flax_fn(module, "fwdbwd")
    xs = random_inputs(shape, jnp.bfloat16, INPUTS, seed=1)
    dys = random_inputs(shape, jnp.bfloat16, INPUTS, seed=2)
    t0 = time.perf_counter()
    compiled = fn.lower(state, xs[0], dys[0]).compile()
    compile_s = time.perf_counter() - t0
    prof = profile_calls(
        lambda i: compiled(state, xs[i % INPUTS], dys[i % INPUTS]), steps, compiled.as_text()
    )
    min_bytes = modules.PASSES["fwdbwd"] * 2 * math.prod(shape)
    return {"compile_s": round(compile_s, 2), "min_bytes": min_bytes, **prof}


def summary_line(row: dict) -> str:
    """One printed line per case: launches, device and wall ms, the costliest instructions."""
    head = f"{row['name']:5s} {'x'.join(map(str, row['shape'][1:])):11s} {row['impl']:11s}"
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
        "--impls", default="", help="comma-separated impls (default: each gate's own list)"
    )
    p.add_argument("--steps", type=int, default=5, help="calls traced per case")
    p.add_argument("--quick", action="store_true", help="tiny shapes (CPU smoke)")
    p.add_argument("--out", type=Path, help="folder for profile_gates.json")
    args = p.parse_args(argv)
    out = args.out or RESULTS / device_slug(args.quick)
    out.mkdir(parents=True, exist_ok=True)
    shapes = modules.QUICK_SHAPES if args.quick else modules.SHAPES
    wanted = [s for s in args.impls.split(",") if s]
    meta = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "steps": args.steps}
    meta["xla_flags"] = os.environ.get("XLA_FLAGS", "")
    rows = []
    for name in args.gates.split(","):
        impls = [i for i in modules.CASES[name].impls if not wanted or i in wanted]
        for shape in shapes:
            for impl in impls:
                row = {"name": name, "impl": impl, "shape": list(shape), "dtype": "bfloat16"}
                try:
                    row.update(profile_case(name, impl, tuple(shape), args.steps))
                except Exception as e:  # a kernel that fails to lower is a result too
                    row["error"] = error_text(e)
                rows.append(row)
                print(summary_line(row), flush=True)
                (out / "profile_gates.json").write_text(
                    json.dumps({**meta, "rows": rows}, indent=1)
                )


if __name__ == "__main__":
    main()
