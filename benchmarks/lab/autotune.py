"""Record XLA's GPU autotuning on an idle GPU, kept per device for every later run's warm phase
(benchmarks/caches.py): `python -m benchmarks.lab.autotune [--quick] [--suites train,modules]`.

In the warm phase other compiles share the GPU, and XLA's timings of the candidate kernels can
pick slower ones: two of four runs on 2026-11-22 gave seresnet50's step a 6-7% slower
executable. So this compiles our cases one at a time on an otherwise idle GPU and adds XLA's
per-fusion autotuning cache to benchmarks/autotune/<device>.tar.gz after each (an interrupted
run keeps what it measured). Record again after changing jax or the GPU image.
"""

from __future__ import annotations

import argparse
import io
import tarfile
from pathlib import Path

from benchmarks import __main__ as runner
from benchmarks import modules, train, warm
from benchmarks.caches import (
    AUTOTUNE_STORE,
    autotune_cache_dir,
    autotune_store_path,
    clear_caches,
    enable_caches,
    read_autotune_store,
)
from benchmarks.device import device_name, device_slug, gpu_memory_gb
from benchmarks.settings import RESULTS

RECORDED = ("train", "modules")  # the suites whose cases XLA autotunes


def save(cache: Path, store: Path) -> int:
    """Add every file of the autotuning folder `cache` to the archive `store` (same bytes for
    the same entries: sorted, no timestamps); returns how many entries `store` holds."""
    entries = read_autotune_store(store)
    for path in sorted(p for p in cache.rglob("*") if p.is_file()):
        entries[path.relative_to(cache).as_posix()] = path.read_bytes()
    store.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(store, "w:gz") as tar:
        for name in sorted(entries):
            info = tarfile.TarInfo(name)
            info.size = len(entries[name])
            tar.addfile(info, io.BytesIO(entries[name]))
    return len(entries)


def record(args: argparse.Namespace, suites: list[str]) -> None:
    """Compile the flax cases of `suites` one at a time, saving the autotuning after each."""
    store = autotune_store_path(args.autotune_dir, device_slug(args.quick))
    budget = gpu_memory_gb()
    for shard in [s for suite in suites for s in runner.shard_list(args, [suite], ["flax"])]:
        summary = warm.run([shard], args.cache, args.cache / "warm", 1, budget)
        count = save(autotune_cache_dir(args.cache), store)
        print(
            f"autotune: {store} holds {count} entries, {len(summary['failed'])} failed", flush=True
        )


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.lab.autotune", description=__doc__)
    p.add_argument("--quick", action="store_true", help="tiny shapes (CPU smoke)")
    p.add_argument("--suites", default="train,modules", help="comma-separated: train, modules")
    p.add_argument("--models", default=",".join(train.MODELS), help="train suite: which")
    p.add_argument("--modules", default=",".join(modules.CASES), help="modules suite: which")
    p.add_argument(
        "--out", type=Path, default=RESULTS, help="results folder (last run's compile times)"
    )
    p.add_argument("--cache", type=Path, default=runner.CACHE, help="compilation caches")
    p.add_argument(
        "--autotune-dir", type=Path, default=AUTOTUNE_STORE, help="recorded autotuning, per device"
    )
    args = p.parse_args(argv)
    unknown = [s for s in args.suites.split(",") if s and s not in RECORDED]
    if unknown:
        p.error(f"--suites: {unknown[0]!r} is not one of {', '.join(RECORDED)}")
    return args


def main(argv: list[str] | None = None) -> None:
    """Record the autotuning of the chosen suites' cases into a fresh compilation cache."""
    args = parse(argv)
    clear_caches(args.cache)
    enable_caches(args.cache)
    print(f"device: {device_name()}", flush=True)
    record(args, [s for s in args.suites.split(",") if s])


if __name__ == "__main__":
    main()
