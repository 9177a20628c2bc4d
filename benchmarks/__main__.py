"""Run the benchmark suites: `python -m benchmarks [--quick] [--suites train,modules,passes]`.

The default is every one-GPU suite; `scaling` needs several GPUs (`--suites scaling`).

Writes benchmarks/results/<device>/<suite>.json (and a PNG chart per suite when matplotlib is
importable); `--quick` uses tiny shapes and writes under <device>-quick (a CPU smoke test).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

from benchmarks import modules, passes, scaling, train
from benchmarks.common import RESULTS, Results, Settings, chart, device_name

SUITES: dict[str, Callable[..., Results]] = {
    "train": train.run,
    "modules": modules.run,
    "passes": passes.run,
    "scaling": scaling.run,
}
# Per-suite sampling, sized so the one-GPU suites fit one run: whole training steps take ~50 ms
# (fewer, longer samples); a module or pass takes 0.05-1.5 ms.
SAMPLING: dict[str, dict[str, float]] = {
    "train": {"samples": 6, "sample_ms": 300.0},
    "modules": {"samples": 10, "sample_ms": 20.0},
    "passes": {"samples": 10, "sample_ms": 20.0},
    "scaling": {"samples": 10, "sample_ms": 300.0},
}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    p.add_argument("--quick", action="store_true", help="tiny shapes, few samples (CPU smoke)")
    p.add_argument("--suites", default="train,modules,passes", help="comma-separated suites")
    p.add_argument("--modules", default=",".join(modules.CASES), help="modules suite: which")
    p.add_argument("--models", default=",".join(train.MODELS), help="train suite: which")
    p.add_argument(
        "--frameworks", default="flax,torch,torch.compile", help="modules, train: which frameworks"
    )
    p.add_argument(
        "--train-impls", default="xla", help="train suite: gate impls of seresnet50, cbam_resnet50"
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
            kwargs["frameworks"] = tuple(args.frameworks.split(","))
        if name == "train":
            kwargs["models"] = tuple(args.models.split(","))
            kwargs["frameworks"] = tuple(args.frameworks.split(","))
            kwargs["kernel_impls"] = tuple(args.train_impls.split(","))
        start = time.perf_counter()
        res = SUITES[name](settings, **kwargs)
        res.meta["suite_wall_s"] = round(time.perf_counter() - start, 1)
        res.write()
        print(f"{name}: {res.path}  chart: {chart(res.path, name, res.rows)}", flush=True)


if __name__ == "__main__":
    main()
