"""CBAM's fused spatial gate (formulation "fused", kernels.spatial_gate) on the GPU: agreement
with the library path and timings.

1. Agreement: SpatialGate (k = 7, float32, training mode) from its two pooled maps at batch 128
   and H = W in (56, 28, 14, 7), "fused" against "conv": max |difference| of the gate, the
   running statistics after the step and the gradients (pooled maps, conv kernel, BatchNorm
   scale and bias), with the largest |value| of each for scale. Then the same gate's
   forward+backward timed per formulation.
2. Timings: the whole CBAM module (channels 256/512/1024/2048 at 56/28/14/7, batch 128,
   bfloat16, training mode), forward and forward+backward, built and timed as the modules suite
   does (`benchmarks.modules.flax_fn`, `benchmarks.timing.time_fn`: median, p10, p90 of 30
   samples) with formulation "fused", "shifts" and "conv".

`python -m benchmarks.lab.spatial_gate_check --out DIR` writes DIR/spatial_gate_check.json
(rewritten after every row) and prints one line per row. `--quick`: tiny shapes, few samples;
off GPU the kernels run in the Pallas interpreter (a CPU smoke run).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from benchmarks import modules
from benchmarks.device import device_name, versions
from benchmarks.results import error_text
from benchmarks.settings import RESULTS, Settings
from benchmarks.timing import jax_sync, random_inputs, time_fn
from flax_attention import CBAM
from flax_attention.layers.cbam import SpatialGate

FORMULATIONS = ("fused", "shifts", "conv")
SIZES = ((56, 256), (28, 512), (14, 1024), (7, 2048))  # H = W, channels: ResNet-50's stages
QUICK_SIZES = ((8, 16), (5, 32))
BATCH, QUICK_BATCH = 128, 2
KERNEL_SIZE = 7


def gate_step(form: str) -> tuple[Callable, Any]:
    """SpatialGate (float32, training mode) with `form` as a jitted pure function of (state,
    avg, max, d_gate) -> (gate, state after the step, gradients w.r.t. (state, avg, max)),
    and its initial state (BatchNorm's scale set away from the official init's 0)."""
    gate = SpatialGate(KERNEL_SIZE, formulation=form, rngs=nnx.Rngs(0))
    gate.bn.scale[...] = jnp.array([0.8])
    gate.train()
    graphdef, state = nnx.split(gate)

    def apply(state, avg, peak):
        module = nnx.merge(graphdef, state)
        out = module.excite({"avg": avg, "max": peak})
        return out, nnx.state(module, nnx.BatchStat)

    def step(state, avg, peak, d_gate):
        out, vjp, new_state = jax.vjp(apply, state, avg, peak, has_aux=True)
        return out, new_state, vjp(d_gate)

    return jax.jit(step), state


def max_abs_diffs(got: Any, want: Any) -> dict[str, float]:
    """max |got - want| and max |want| over all leaves of two same-structured pytrees."""
    pairs = list(zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True))
    diff = max(
        float(jnp.max(jnp.abs(g.astype(jnp.float32) - w.astype(jnp.float32)))) for g, w in pairs
    )
    scale = max(float(jnp.max(jnp.abs(w.astype(jnp.float32)))) for _, w in pairs)
    return {"max_abs_diff": diff, "max_abs_value": scale}


def agreement_rows(settings: Settings, sizes, batch: int):
    """Per size: "fused" vs "conv" differences, then each formulation's forward+backward of the
    gate alone, timed."""
    for h, _ in sizes:
        avg, peak, d_gate = random_inputs((batch, h, h), jnp.float32, 3, seed=h)
        d_gate = d_gate[..., None]
        base = {"case": "spatial_gate", "shape": [batch, h, h], "kernel_size": KERNEL_SIZE}
        outputs = {}
        for form in FORMULATIONS:
            row = {**base, "formulation": form, "mode": "fwdbwd", "dtype": "float32"}
            try:
                step, state = gate_step(form)
                outputs[form] = step(state, avg, peak, d_gate)
                inputs = [(state, avg, peak, d_gate)]
                row.update(time_fn(step, inputs, jax_sync, settings).as_dict())
            except Exception as e:  # a formulation that fails is a result too
                row["error"] = error_text(e)
            yield row
        if {"fused", "conv"} <= outputs.keys():
            for part, index in (("gate", 0), ("running_stats", 1), ("grads", 2)):
                got, want = outputs["fused"][index], outputs["conv"][index]
                yield {**base, "compare": f"fused vs conv: {part}", **max_abs_diffs(got, want)}


def module_rows(settings: Settings, sizes, batch: int):
    """The CBAM module (bfloat16, training mode) per size x mode x formulation, timed."""
    for h, channels in sizes:
        shape = (batch, h, h, channels)
        xs = random_inputs(shape, jnp.bfloat16, settings.inputs, seed=1)
        dys = random_inputs(shape, jnp.bfloat16, settings.inputs, seed=2)
        for mode in modules.MODES:
            for form in FORMULATIONS:
                row = {"case": "cbam", "shape": list(shape), "mode": mode, "formulation": form}
                row["dtype"] = "bfloat16"
                try:
                    module = CBAM(
                        channels, 16, formulation=form, rngs=nnx.Rngs(0), dtype=jnp.bfloat16
                    )
                    module.train()
                    fn, state = modules.flax_fn(module, mode)
                    inputs = [(state, x, dy) for x, dy in zip(xs, dys, strict=True)]
                    row.update(time_fn(fn, inputs, jax_sync, settings).as_dict())
                except Exception as e:
                    row["error"] = error_text(e)
                yield row
        del xs, dys


def summary_line(row: dict) -> str:
    head = f"{row['case']:12s} {'x'.join(map(str, row['shape'])):16s}"
    if "compare" in row:
        return f"{head} {row['compare']:28s} max|diff| {row['max_abs_diff']:.3g} (max|value| {row['max_abs_value']:.3g})"
    head += f" {row['mode']:6s} {row['formulation']:6s}"
    if "error" in row:
        return f"{head} error: {row['error'][:100]}"
    return f"{head} {row['median_ms']:9.4f} ms (p10 {row['p10_ms']:.4f}, p90 {row['p90_ms']:.4f})"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, help="folder for spatial_gate_check.json")
    p.add_argument("--quick", action="store_true", help="tiny shapes, few samples (CPU smoke)")
    p.add_argument("--samples", type=int, default=30, help="timed samples per row")
    args = p.parse_args(argv)
    if args.samples < 1:
        p.error("--samples must be at least 1")
    out = args.out or RESULTS
    settings = Settings.make(args.quick, out)
    if not args.quick:
        settings.samples = args.samples
    sizes, batch = (QUICK_SIZES, QUICK_BATCH) if args.quick else (SIZES, BATCH)
    meta = {
        "device": device_name(),
        "versions": versions(),
        "quick": args.quick,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "samples": settings.samples,
    }
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    cases = itertools.chain(
        agreement_rows(settings, sizes, batch), module_rows(settings, sizes, batch)
    )
    for row in cases:
        rows.append(row)
        print(summary_line(row), flush=True)
        (out / "spatial_gate_check.json").write_text(
            json.dumps({**meta, "rows": rows}, indent=1) + "\n"
        )


if __name__ == "__main__":
    main()
