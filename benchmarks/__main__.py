"""Run the benchmark suites: `python -m benchmarks [--quick] [--suites modules,train,scaling]`.

Writes benchmarks/results/<device>/<suite>.json (and a PNG chart per suite when matplotlib is
importable); `--quick` uses tiny shapes and writes under <device>-quick (a CPU smoke test).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

from benchmarks import modules, scaling, train
from benchmarks.common import RESULTS, Results, Settings, chart, device_name

SUITES: dict[str, Callable[..., Results]] = {
    "modules": modules.run,
    "train": train.run,
    "scaling": scaling.run,
}
# Per-suite sampling: whole training steps take ~50 ms, so fewer, longer samples.
SAMPLING: dict[str, dict[str, float]] = {
    "train": {"samples": 10, "sample_ms": 300.0},
    "scaling": {"samples": 10, "sample_ms": 300.0},
}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    p.add_argument("--quick", action="store_true", help="tiny shapes, few samples (CPU smoke)")
    p.add_argument("--suites", default="modules,train,scaling", help="comma-separated suites")
    p.add_argument("--modules", default=",".join(modules.CASES), help="modules suite: which")
    p.add_argument("--models", default=",".join(train.MODELS), help="train suite: which")
    p.add_argument(
        "--frameworks", default="flax,torch,torch.compile", help="train suite: which frameworks"
    )
    p.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    p.add_argument("--charts-only", action="store_true", help="redraw PNGs from existing JSON")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    names = [s for s in args.suites.split(",") if s]
    for name in names:
        if name not in SUITES:
            raise SystemExit(f"unknown suite {name!r}; choose from {list(SUITES)}")
    print(f"device: {device_name()}", flush=True)
    for name in names:
        settings = Settings.make(args.quick, args.out)
        if not args.quick:
            for key, value in SAMPLING.get(name, {}).items():
                setattr(settings, key, value)
        if args.charts_only:
            path = Results(name, settings).path
            if path.exists():
                print(chart(path, name, json.loads(path.read_text())["rows"]))
            continue
        kwargs = {}
        if name == "modules":
            kwargs["names"] = tuple(args.modules.split(","))
        if name == "train":
            kwargs["models"] = tuple(args.models.split(","))
            kwargs["frameworks"] = tuple(args.frameworks.split(","))
        res = SUITES[name](settings, **kwargs)
        print(f"{name}: {res.path}  chart: {chart(res.path, name, res.rows)}", flush=True)


if __name__ == "__main__":
    main()
