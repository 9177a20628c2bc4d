"""XLA's GPU autotuning results, measured once on an idle GPU and kept per device.

XLA picks convolution algorithms and fusion tilings by timing the candidates on the GPU. In the
warm phase (warm.py) other compiles share the GPU, and the timings can pick slower kernels: two
of four runs on 2026-11-22 gave seresnet50's step a 6-7% slower executable. So
`python -m benchmarks --record-autotune` compiles our cases one at a time on an otherwise idle
GPU and keeps XLA's per-fusion autotuning cache as benchmarks/autotune/<device>.json, and every
run copies these entries into its fresh cache once our resnet50 step has compiled (cold, its
compile time is a target): the parallel workers then look their fusions up instead of timing
them. An entry's file name hashes the GPU's description with the fusion's HLO, so entries of
another GPU or XLA version are never used, and those fusions are autotuned as before.
"""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.common import ROOT

STORE = ROOT / "benchmarks" / "autotune"


def cache_dir(compile_cache: Path) -> Path:
    """The per-fusion autotuning folder JAX gives XLA inside its compilation cache."""
    return compile_cache / "jax" / "xla_gpu_per_fusion_autotune_cache_dir"


def store_path(device_slug: str) -> Path:
    return STORE / f"{device_slug}.json"


def save(cache: Path, store: Path) -> int:
    """Add every entry of the autotuning folder `cache` to `store` (a JSON object, relative
    file name -> the file's text); returns how many entries `store` holds."""
    entries = json.loads(store.read_text()) if store.exists() else {}
    for path in sorted(p for p in cache.rglob("*") if p.is_file()):
        entries[path.relative_to(cache).as_posix()] = path.read_text()
    store.parent.mkdir(parents=True, exist_ok=True)
    store.write_text(json.dumps(entries, indent=0, sort_keys=True) + "\n")
    return len(entries)


def seed(store: Path, cache: Path) -> int:
    """Write `store`'s entries into the autotuning folder `cache`, keeping entries already
    there; returns how many were written (0 when there is no store for this device)."""
    if not store.exists():
        return 0
    written = 0
    for name, text in json.loads(store.read_text()).items():
        path = cache / name
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            written += 1
    return written
