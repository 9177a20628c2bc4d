"""The fused gates' passes one by one: each executor's correctness against XLA, and its speed.

Every pass of kernels/passes.py runs at the four ResNet-50 stage shapes (batch 128, bf16) under
each executor: `xla` (the step on whole tensors), `mosaic_tma` (Mosaic GPU, output tiles by TMA)
and `mosaic_direct` (output tiles stored from registers); on CPU (`--quick`) the `pallas_call`
and Mosaic GPU interpreters instead. The maxima a pass takes are found by the executor's own
pools, as in the modules. Each row carries the largest error against the `xla` executor relative
to the output's scale, the time, the minimal bytes (tiles read + tiles written) and the fraction
of the copy bandwidth that reaches.

Run: python -m benchmarks.passes [--quick] [--passes NAME,...] [--out DIR]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import (
    RESULTS,
    Results,
    Settings,
    copy_bandwidth,
    error_text,
    jax_sync,
    max_rel_error,
    time_fn,
)
from flax_attention.kernels import passes
from flax_attention.kernels.executors import MosaicGpu, PallasCall, Problem, Xla

PASSES = {
    p.name: p
    for p in (
        passes.CHANNEL_POOL,
        passes.SPATIAL_POOL,
        passes.APPLY_CHANNEL_GATE,
        passes.APPLY_BOTH_GATES,
        passes.CHANNEL_GATE_GRADS,
        passes.BOTH_GATES_GRADS,
        passes.DESCRIPTOR_GRADS,
        passes.CHANNEL_GATE_INPUT_GRAD,
        passes.BOTH_GATES_INPUT_GRAD,
    )
}
SHAPES = ((128, 3136, 256), (128, 784, 512), (128, 196, 1024), (128, 49, 2048))
QUICK_SHAPES = ((2, 16, 256), (1, 12, 512))


def executors(quick: bool) -> dict[str, Callable]:
    if quick:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

        gpu = InterpretGPUParams()
        return {
            "xla": Xla(),
            "pallas_interpret": PallasCall(lambda: {"interpret": True}),
            "mosaic_interpret": MosaicGpu(interpret=gpu, tma_stores=False),
        }
    return {"xla": Xla(), "mosaic_tma": MosaicGpu(), "mosaic_direct": MosaicGpu(tma_stores=False)}


def make_inputs(shape: tuple[int, int, int], count: int, executor, problem) -> list[dict]:
    """`count` sets of every input any pass takes; the maxima come from `executor`'s own pools,
    as in the modules (so ties are counted against the maxima the same kernels found)."""
    n, hw, c = shape

    @jax.jit
    def maxima(x, cg):
        chan = executor(passes.CHANNEL_POOL, problem, x=x)["max"]
        return chan, executor(passes.SPATIAL_POOL, problem, x=x, cg=cg)["max"]

    sets = []
    for seed in range(count):
        k = iter(jax.random.split(jax.random.key(seed), 8))
        x = jax.random.normal(next(k), shape, jnp.float32).astype(jnp.bfloat16)
        cg = jax.nn.sigmoid(jax.random.normal(next(k), (n, c)))
        inputs = {
            "x": x,
            "dy": jax.random.normal(next(k), shape, jnp.float32).astype(jnp.bfloat16),
            "cg": cg,
            "sg": jax.nn.sigmoid(jax.random.normal(next(k), (n, hw))),
            "d_sum": jax.random.normal(next(k), (n, c)) * 1e-3,
            "d_chan_max": jax.random.normal(next(k), (n, c)) * 1e-2,
            "d_pix_max": jax.random.normal(next(k), (n, hw)) * 1e-2,
            "d_pix_sum": jax.random.normal(next(k), (n, hw)) * 1e-3,
        }
        inputs["chan_max"], inputs["pix_max"] = maxima(x, cg)
        sets.append(inputs)
    return sets


def pass_fn(executor, p: passes.Pass, problem: Problem) -> Callable:
    names = (*p.tiles, *p.channels, *p.pixels)

    @jax.jit
    def fn(inputs):
        return executor(p, problem, **{k: inputs[k] for k in names})

    return fn


def run(settings: Settings, names: tuple[str, ...] = tuple(PASSES)) -> Results:
    res = Results("passes", settings)
    gbps = copy_bandwidth(settings)["gbps"]
    res.meta["copy_bandwidth_gbps"] = gbps
    execs = executors(settings.quick)
    for shape in QUICK_SHAPES if settings.quick else SHAPES:
        problem = Problem(*shape, jnp.bfloat16)
        input_sets: dict[str, list[dict]] = {}  # per executor, made on first use
        for name in names:
            p = PASSES[name]
            tile_outs = sum(kind == "tile" for _, kind in p.outputs)
            n_bytes = (len(p.tiles) + tile_outs) * 2 * int(np.prod(shape))
            base = {"name": name, "shape": list(shape), "batch": shape[0], "dtype": "bfloat16"}
            base |= {"min_bytes": n_bytes, "floor_ms": n_bytes / gbps / 1e6}
            ref = None
            for ex_name, executor in execs.items():
                if ex_name == "mosaic_direct" and not tile_outs:
                    continue  # same kernel as mosaic_tma
                row = {**base, "impl": ex_name}
                try:
                    if ex_name not in input_sets:
                        input_sets[ex_name] = make_inputs(shape, settings.inputs, executor, problem)
                    sets = input_sets[ex_name]
                    fn = pass_fn(executor, p, problem)
                    out = fn(sets[0])
                    if ref is None:
                        ref = out
                    row["rel_err"] = max_rel_error(out, ref)
                    row.update(time_fn(fn, [(s,) for s in sets], jax_sync, settings).as_dict())
                    row["bw_frac"] = round(row["floor_ms"] / row["median_ms"], 4)
                except Exception as e:  # a pass that fails to lower is a result too
                    row["error"] = error_text(e)
                res.add(row)
    return res


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.passes", description=__doc__)
    ap.add_argument("--quick", action="store_true", help="tiny shapes on CPU interpreters")
    ap.add_argument("--passes", default=",".join(PASSES), help="comma-separated pass names")
    ap.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    args = ap.parse_args(argv)
    res = run(Settings.make(args.quick, args.out), tuple(args.passes.split(",")))
    print(res.path)


if __name__ == "__main__":
    main()
