"""XLA's GPU autotuning results, measured once on an idle GPU and kept per device.

XLA picks convolution algorithms and fusion tilings by timing the candidates on the GPU. In the
warm phase (warm.py) other compiles share the GPU, and the timings can pick slower kernels: two
of four runs on 2026-11-22 gave seresnet50's step a 6-7% slower executable. So
`python -m benchmarks --record-autotune` compiles our cases one at a time on an otherwise idle
GPU and keeps XLA's per-fusion autotuning cache (binary protos, a folder per GPU description and
a file per fusion's HLO hash) as benchmarks/autotune/<device>.tar.gz. Every run copies these
entries into its fresh cache once our resnet50 step has compiled (cold: its compile time is a
target), so the parallel workers look their fusions up instead of timing them under contention.
Fusions without an entry (another GPU, changed code) are autotuned as before; record again after
changing jax or the GPU image.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

from benchmarks.common import ROOT

STORE = ROOT / "benchmarks" / "autotune"


def cache_dir(compile_cache: Path) -> Path:
    """The per-fusion autotuning folder JAX gives XLA inside its compilation cache."""
    return compile_cache / "jax" / "xla_gpu_per_fusion_autotune_cache_dir"


def store_path(folder: Path, device_slug: str) -> Path:
    return folder / f"{device_slug}.tar.gz"


def read_store(store: Path) -> dict[str, bytes]:
    """`store`'s entries, relative file name -> contents (empty when there is no store)."""
    if not store.exists():
        return {}
    with tarfile.open(store) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


def save(cache: Path, store: Path) -> int:
    """Add every file of the autotuning folder `cache` to the archive `store` (same bytes for
    the same entries: sorted, no timestamps); returns how many entries `store` holds."""
    entries = read_store(store)
    for path in sorted(p for p in cache.rglob("*") if p.is_file()):
        entries[path.relative_to(cache).as_posix()] = path.read_bytes()
    store.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(store, "w:gz") as tar:
        for name in sorted(entries):
            info = tarfile.TarInfo(name)
            info.size = len(entries[name])
            tar.addfile(info, io.BytesIO(entries[name]))
    return len(entries)


def seed(store: Path, cache: Path) -> int:
    """Write `store`'s entries into the autotuning folder `cache`, keeping entries already
    there; returns how many were written (0 when there is no store for this device)."""
    written = 0
    for name, data in read_store(store).items():
        path = cache / name
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            written += 1
    return written
