"""BatchNorm's batch statistics from one pass over x against the two passes they replaced.

The library computes the mean and biased variance from one reduction of the sums of x - s and
(x - s)^2, s the first sample's per-channel mean (`layers.batch_norm.moments`, and
`layers.norm_gate.per_sample_moments` where a channel gate shares the pass). Before, the
variance was mean((x - mean)^2), a second pass over x after the mean's. This experiment builds
the train suite's step (`benchmarks.train.flax_step`: bf16, batch 256, synthetic data on the
device) with each, the two-pass formulas patched in while its variant is traced, and times the
steps alternately, round by round (median of `Settings` samples, one step each).

`python -m benchmarks.lab.experiments.bn_statistics [--quick] [--models resnet50,...]
[--rounds 2] [--out DIR]` writes `<out>/bn_statistics.json` (by default
benchmarks/lab/experiments/results/<device>/).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
from collections.abc import Iterator
from pathlib import Path

import jax
import jax.numpy as jnp

from benchmarks import train
from benchmarks.caches import (
    AUTOTUNE_STORE,
    autotune_cache_dir,
    autotune_store_path,
    enable_caches,
    seed_autotune,
)
from benchmarks.device import device_slug
from benchmarks.lab.experiments import write_record
from benchmarks.settings import Settings
from benchmarks.timing import jax_sync, time_fn
from flax_attention.layers import batch_norm, norm_gate
from flax_attention.models import MODELS as MODELS_REGISTRY

MODELS = ("resnet50", "seresnet50")


def two_pass_statistics(x32: jax.Array, axis_name: str | None) -> tuple[jax.Array, jax.Array]:
    """`batch_norm.batch_statistics` as it was: the mean, then mean((x - mean)^2)."""
    axes = tuple(range(x32.ndim - 1))
    mean = x32.mean(axes)
    return batch_norm.combine_replicas(mean, jnp.square(x32 - mean).mean(axes), axis_name)


def two_pass_per_sample(x32: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`norm_gate.per_sample_moments` as it was: per-sample means, then the variance's pass."""
    per_sample = x32.mean((1, 2))
    mean = per_sample.mean(0)
    return per_sample, mean, jnp.square(x32 - mean).mean((0, 1, 2))


@contextlib.contextmanager
def two_pass() -> Iterator[None]:
    """While active, models trace the two-pass statistics."""
    saved = batch_norm.batch_statistics, norm_gate.per_sample_moments
    batch_norm.batch_statistics, norm_gate.per_sample_moments = (
        two_pass_statistics,
        two_pass_per_sample,
    )
    try:
        yield
    finally:
        batch_norm.batch_statistics, norm_gate.per_sample_moments = saved


VARIANTS = {"one_pass": contextlib.nullcontext, "two_pass": two_pass}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.lab.experiments.bn_statistics")
    parser.add_argument("--quick", action="store_true", help="CPU smoke: tiny shapes")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    models = args.models.split(",")
    unknown = sorted(set(models) - set(MODELS_REGISTRY))
    if unknown:
        parser.error(f"unknown models {unknown}; `flax-attention list` names the registered ones")
    if args.rounds < 1 or args.samples < 1:
        parser.error(f"--rounds and --samples must be >= 1, got {args.rounds}, {args.samples}")
    cache = Path(tempfile.mkdtemp())
    enable_caches(cache)
    seed_autotune(autotune_store_path(AUTOTUNE_STORE, device_slug()), autotune_cache_dir(cache))
    settings = Settings.make(args.quick)
    settings.samples = args.samples
    batch = train.QUICK_BATCH if args.quick else train.BATCH
    image = train.QUICK_IMAGE if args.quick else train.IMAGE
    rows = []
    for model in models:
        steps = {}
        for name, variant in VARIANTS.items():
            with variant():
                steps[name] = train.flax_step(model, batch, image, 4)
        for round_ in range(args.rounds):
            for name, step in steps.items():
                t = time_fn(step, step.data, jax_sync, settings)
                img_per_s = round(batch / t.median_ms * 1e3, 1)
                row = {"model": model, "batch": batch, "variant": name, "round": round_}
                rows.append({**row, "img_per_s": img_per_s, **t.as_dict()})
                print(json.dumps(rows[-1]), flush=True)
        del steps
    write_record("bn_statistics", rows, args.out, args.quick)


if __name__ == "__main__":
    main()
