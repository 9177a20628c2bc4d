"""The scaling suite with two ablations and kernel profiles:
`python -m benchmarks.lab.scaling_ablations [--quick] [--out DIR]`.

Besides the suite's rows (benchmarks/scaling.py), two variants that are no training mode:
- `jit_spmd`, the `jit` form before shard_map: `jax.jit` of the step with no axis names over the
  mesh; XLA's SPMD partitioner makes the BatchNorm statistics global (several small all-reduces
  per BatchNorm) and reduces the gradients;
- `pmap_local_bn`: `pmap` with each replica's own BatchNorm statistics, so the step's only
  collective is the gradient `pmean`; its gap to `pmap` is what the cross-replica BatchNorm
  collectives cost.
Then at the largest device count the `jit` and `pmap_local_bn` steps are traced:
`meta["profiles"]` holds each one's kernel time by category (summed over the devices) and its
costliest collectives, so the gap between exact and per-device BatchNorm statistics can be read
as collective time. Writes <out>/<device>/scaling.json like the suite.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import jax
from flax import nnx

from benchmarks import scaling
from benchmarks.__main__ import SAMPLING
from benchmarks.lab.profiling import profile_calls
from benchmarks.results import Results, error_text
from benchmarks.settings import RESULTS, Settings
from flax_attention.training.parallel import MeshForm, PmapForm, on_placed_state
from flax_attention.training.state import set_batchnorm_axis_name

PROFILED = ("jit", "pmap_local_bn")  # traced at the largest device count, after the timings
PROFILE_STEPS, PROFILE_TOP = 5, 12


def local_batchnorm(form: MeshForm, model: nnx.Module) -> None:
    """Every BatchNorm keeps its device's own statistics, whatever the form's axis."""
    set_batchnorm_axis_name(model, None)


def spmd_jit(form: MeshForm, step: Callable) -> Callable:
    """`jax.jit` of the plain step over `form`'s mesh, partitioned by XLA's SPMD partitioner;
    it takes and returns the form's placed state."""
    return jax.jit(
        on_placed_state(step),
        in_shardings=(form.replicated, form.sharded),
        out_shardings=(form.replicated, form.replicated),
        donate_argnums=0,
    )


ABLATIONS: dict[str, scaling.Variant] = {
    "jit_spmd": scaling.Variant(MeshForm, local_batchnorm, spmd_jit),
    "pmap_local_bn": scaling.Variant(
        lambda devices: PmapForm(devices, grad_sync="end"), local_batchnorm
    ),
}
VARIANTS = {**scaling.VARIANTS, **ABLATIONS}


def profile(impl: str, n: int, settings: Settings) -> dict:
    """Where the step of `impl` on n devices spends its device time: kernel time per category
    summed over the n devices (`profile_calls`) and the costliest collectives. A collective
    kernel's time includes its wait for the slowest device."""
    batch = scaling.QUICK_BATCH if settings.quick else scaling.PER_DEVICE_BATCH
    image = scaling.QUICK_IMAGE if settings.quick else scaling.IMAGE
    name = scaling.MODELS[0]
    _, run, data, hlo_text = scaling.compile_step(name, VARIANTS[impl], n, settings, batch, image)
    prof = profile_calls(lambda i: run(*data[i % len(data)]), PROFILE_STEPS, hlo_text)
    collectives = [op for op in prof["ops"] if op["category"] == "collective"]
    return {
        "impl": impl,
        "n_devices": n,
        "wall_ms": prof["wall_ms"],
        "device_ms_per_device": round(prof["device_ms"] / n, 4),
        "categories_all_devices": prof["categories"],
        "top_collectives": [
            {k: op[k] for k in ("op", "ms", "launches", "bytes", "source")}
            for op in collectives[:PROFILE_TOP]
        ],
    }


def run(settings: Settings, counts: tuple[int, ...] = scaling.DEVICE_COUNTS) -> Results:
    """The suite's rows and the ablations' at each device count the machine has, then the
    profiles of `PROFILED` at the largest count (none on one device)."""
    res = scaling.run(settings, counts, VARIANTS)
    largest = max((n for n in counts if n <= jax.device_count()), default=1)
    if largest > 1 and not settings.warm_only:
        res.meta["profiles"] = []
        for impl in PROFILED:
            try:
                res.meta["profiles"].append(profile(impl, largest, settings))
            except Exception as e:
                res.meta["profiles"].append({"impl": impl, "error": error_text(e)})
        res.write()
    return res


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.lab.scaling_ablations")
    p.add_argument("--quick", action="store_true", help="tiny model and images (CPU smoke)")
    p.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    args = p.parse_args(argv)
    settings = Settings.make(args.quick, args.out)
    if not args.quick:
        for key, value in SAMPLING["scaling"].items():
            setattr(settings, key, value)
    print(f"scaling: {run(settings).path}", flush=True)


if __name__ == "__main__":
    main()
