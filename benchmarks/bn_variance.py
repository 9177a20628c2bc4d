"""How much the exact BatchNorm variance costs a training step.

The library's BatchNorm computes the batch variance as mean((x - mean)^2) in float32 (two passes
over the activation; what PyTorch parity needs). This measures the train-suite step of each
model in `MODELS` with it and with the one-pass E[x^2] - E[x]^2 (Flax's `use_fast_variance`,
less accurate: a reference point only, never used by the library), in one process.

`python -m benchmarks.bn_variance [--quick] [--out DIR]` writes `<out>/bn_variance.json`.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import jax
import jax.numpy as jnp

from benchmarks import train
from benchmarks.__main__ import SAMPLING
from benchmarks.common import Settings, error_text, format_row
from flax_attention.layers.common import BatchNorm

MODELS = ("resnet50", "seresnet50")


def _one_pass(self: BatchNorm, x32: jax.Array, axes: tuple[int, ...]):
    mean, mean_sq = x32.mean(axes), jnp.square(x32).mean(axes)
    if self.axis_name is not None:
        mean, mean_sq = jax.lax.pmean((mean, mean_sq), self.axis_name)
    return mean, jnp.maximum(mean_sq - jnp.square(mean), 0.0)


def _merge(a, b):
    """Chan et al.'s merge of two (count, mean, M2) partial statistics."""
    (na, ma, qa), (nb, mb, qb) = a, b
    n = na + nb
    w = jnp.where(n > 0, nb / jnp.where(n > 0, n, 1.0), 0.0)
    d = mb - ma
    return n, ma + d * w, qa + qb + d * d * na * w


@jax.custom_vjp
def welford_stats(x32: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(mean, mean((x - mean)^2)) over all axes but the last, in one variadic reduction."""
    axes = tuple(range(x32.ndim - 1))
    operands = (jnp.ones_like(x32), x32, jnp.zeros_like(x32))
    _, mean, m2 = jax.lax.reduce(operands, (0.0, 0.0, 0.0), _merge, axes)
    return mean, m2 / (x32.size // x32.shape[-1])


def _welford_fwd(x32):
    mean, var = welford_stats(x32)
    return (mean, var), (x32, mean)


def _welford_bwd(res, g):
    x32, mean = res
    n = x32.size // x32.shape[-1]
    return (g[0] / n + g[1] * 2.0 * (x32 - mean) / n,)


welford_stats.defvjp(_welford_fwd, _welford_bwd)


def _welford(self: BatchNorm, x32: jax.Array, axes: tuple[int, ...]):
    return welford_stats(x32)


VARIANTS: dict[str, Callable | None] = {
    "two_pass": None,
    "one_pass": _one_pass,
    "welford": _welford,
}


@contextmanager
def variance(variant: str) -> Iterator[None]:
    """Within the block, BatchNorm's batch statistics use `variant`."""
    original = BatchNorm._batch_stats
    if VARIANTS[variant] is not None:
        BatchNorm._batch_stats = VARIANTS[variant]
    try:
        yield
    finally:
        BatchNorm._batch_stats = original


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny shapes, few samples (CPU smoke)")
    p.add_argument("--out", type=Path, default=Path("."), help="folder for bn_variance.json")
    args = p.parse_args(argv)
    settings = Settings.make(args.quick)
    if not args.quick:
        for key, value in SAMPLING["train"].items():
            setattr(settings, key, value)
    batch = train.QUICK_BATCH if args.quick else train.BATCH
    image = train.QUICK_IMAGE if args.quick else train.IMAGE
    rows = []
    for name in MODELS:
        for variant in VARIANTS:
            row = {"experiment": "bn_variance", "name": name, "variant": variant, "batch": batch}
            row.update(shape=[batch, image, image, 3], framework="flax", impl="xla")
            try:
                with variance(variant):
                    row.update(train.flax_row(name, "xla", settings, batch, image))
            except Exception as e:
                row["error"] = error_text(e)
            print(format_row(row), variant, flush=True)
            rows.append(row)
    meta = {"device": jax.devices()[0].device_kind, "jax": jax.__version__}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bn_variance.json").write_text(json.dumps({**meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
