"""The ResNet stem's formulation (`flax_attention.models.stem.FORMULATIONS`) in a training step.

Times the train suite's step (batch 256, 224x224, bf16) of each model in `--models` with every
stem formulation, in one process. `python -m benchmarks.stem [--quick] [--models resnet50]
[--out DIR]` writes `<out>/stem.json`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax

from benchmarks import train
from benchmarks.__main__ import SAMPLING
from benchmarks.common import Settings, error_text, format_row
from flax_attention.models.stem import FORMULATIONS, StemConv


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny shapes, few samples (CPU smoke)")
    p.add_argument("--models", default="resnet50", help="comma-separated models")
    p.add_argument("--out", type=Path, default=Path("."), help="folder for stem.json")
    args = p.parse_args(argv)
    settings = Settings.make(args.quick)
    if not args.quick:
        for key, value in SAMPLING["train"].items():
            setattr(settings, key, value)
    batch = train.QUICK_BATCH if args.quick else train.BATCH
    image = train.QUICK_IMAGE if args.quick else train.IMAGE
    rows, default = [], StemConv.formulation
    for name in args.models.split(","):
        for formulation in FORMULATIONS:
            row = {"experiment": "stem", "name": name, "variant": formulation, "batch": batch}
            row.update(shape=[batch, image, image, 3], framework="flax", impl="xla")
            StemConv.formulation = formulation
            try:
                row.update(train.flax_row(name, "xla", settings, batch, image))
            except Exception as e:
                row["error"] = error_text(e)
            finally:
                StemConv.formulation = default
            print(format_row(row), formulation, flush=True)
            rows.append(row)
    meta = {"device": jax.devices()[0].device_kind, "jax": jax.__version__}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "stem.json").write_text(json.dumps({**meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
