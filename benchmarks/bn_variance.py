"""What BatchNorm's formulation costs a training step.

The library's BatchNorm (`flax_attention.layers.batch_norm`) is a custom VJP: the forward takes
the exact two-pass variance mean((x - mean)^2) in float32 and keeps only x in its own dtype for
the backward, which is one fused reduction and one elementwise pass. This times the train
suite's step of each model in `MODELS` with it and with:
- `autodiff_two_pass`: the same forward differentiated by plain autodiff (the library's
  BatchNorm before the custom VJP; XLA then keeps x - mean in float32 for the backward);
- `fused_one_pass`: the custom VJP with E[x^2] - E[x]^2 (one pass over x, cancels badly when
  |mean| >> std: a reference point, never used by the library);
- `fused_shifted`: the custom VJP with the variance of x - s, s = x[0, 0, 0] per channel (one
  pass, exact up to rounding whenever s is within a few std of the mean; single device only).

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
from flax_attention.layers import batch_norm
from flax_attention.layers.batch_norm import BatchNorm

MODELS = ("resnet50", "seresnet50")
F32 = jnp.float32


def _autodiff_two_pass(self: BatchNorm, x: jax.Array, dtype) -> jax.Array:
    axes = tuple(range(x.ndim - 1))
    x32 = x.astype(F32)
    mean = x32.mean(axes)
    var = jnp.square(x32 - mean).mean(axes)
    keep = self.momentum
    n = x.size // x.shape[-1]
    self.mean[...] = jax.lax.stop_gradient(keep * self.mean[...] + (1 - keep) * mean)
    self.var[...] = jax.lax.stop_gradient(keep * self.var[...] + (1 - keep) * var * n / (n - 1))
    y = (x32 - mean) * jax.lax.rsqrt(var + self.epsilon)
    return (y * self.scale[...] + self.bias[...]).astype(dtype)


def _one_pass_stats(x32: jax.Array, axis_name: str | None):
    axes = tuple(range(x32.ndim - 1))
    mean, mean_sq = x32.mean(axes), jnp.square(x32).mean(axes)
    return mean, jnp.maximum(mean_sq - jnp.square(mean), 0.0)


def _shifted_stats(x32: jax.Array, axis_name: str | None):
    axes = tuple(range(x32.ndim - 1))
    shift = x32[(0,) * (x32.ndim - 1)]
    xs = x32 - shift
    mean_s, mean_sq = xs.mean(axes), jnp.square(xs).mean(axes)
    return shift + mean_s, jnp.maximum(mean_sq - jnp.square(mean_s), 0.0)


# variant -> (BatchNorm._normalize_batch replacement, batch_norm.batch_statistics replacement)
VARIANTS: dict[str, tuple[Callable | None, Callable | None]] = {
    "fused_two_pass": (None, None),
    "autodiff_two_pass": (_autodiff_two_pass, None),
    "fused_one_pass": (None, _one_pass_stats),
    "fused_shifted": (None, _shifted_stats),
}


@contextmanager
def formulation(variant: str) -> Iterator[None]:
    """Within the block, BatchNorm's training mode uses `variant`."""
    normalize, stats = VARIANTS[variant]
    saved = BatchNorm._normalize_batch, batch_norm.batch_statistics
    if normalize is not None:
        BatchNorm._normalize_batch = normalize
    if stats is not None:
        batch_norm.batch_statistics = stats
    try:
        yield
    finally:
        BatchNorm._normalize_batch, batch_norm.batch_statistics = saved


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny shapes, few samples (CPU smoke)")
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated models")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated variants")
    p.add_argument("--out", type=Path, default=Path("."), help="folder for bn_variance.json")
    args = p.parse_args(argv)
    settings = Settings.make(args.quick)
    if not args.quick:
        for key, value in SAMPLING["train"].items():
            setattr(settings, key, value)
    batch = train.QUICK_BATCH if args.quick else train.BATCH
    image = train.QUICK_IMAGE if args.quick else train.IMAGE
    rows = []
    for name in args.models.split(","):
        for variant in args.variants.split(","):
            row = {"experiment": "bn_variance", "name": name, "variant": variant, "batch": batch}
            row.update(shape=[batch, image, image, 3], framework="flax", impl="xla")
            try:
                with formulation(variant):
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
