"""The persistent compilation caches a benchmark run compiles into, and XLA's GPU autotuning
results kept per device (benchmarks/autotune/<device>.tar.gz, recorded by
`python -m benchmarks.lab.autotune`).

XLA picks convolution algorithms and fusion tilings by timing the candidates on the GPU. In the
warm phase (warm.py) other compiles share the GPU, and the timings can pick slower kernels. So
the recorded entries (XLA's per-fusion autotuning cache: binary protos, a folder per GPU
description and a file per fusion's HLO hash) are copied into every run's fresh cache once its
first case has compiled, and the parallel workers look their fusions up instead of timing them
under contention. Fusions without an entry (another GPU, changed code) are autotuned as before.
"""

from __future__ import annotations

import os
import shutil
import tarfile
from pathlib import Path

import jax

from benchmarks.settings import ROOT

CACHE_PARTS = ("jax", "inductor", "triton", "warm")  # what the benchmarks write in a cache
AUTOTUNE_STORE = ROOT / "benchmarks" / "autotune"


def clear_caches(cache_dir: Path) -> None:
    """Delete the benchmarks' own folders in `cache_dir` (`CACHE_PARTS`); anything else
    there is left alone."""
    for part in CACHE_PARTS:
        shutil.rmtree(cache_dir / part, ignore_errors=True)


def enable_caches(cache_dir: Path) -> None:
    """Persistent compilation caches under `cache_dir`: JAX's (every entry, however small or
    quick to compile, and XLA's per-fusion autotuning results) and Inductor's FX-graph and
    AOTAutograd caches, each in its folder of `CACHE_PARTS`. Call before torch imports."""
    jax.config.update("jax_compilation_cache_dir", str(cache_dir / "jax"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir / "inductor")
    os.environ["TRITON_CACHE_DIR"] = str(cache_dir / "triton")
    os.environ["TORCHINDUCTOR_FX_GRAPH_CACHE"] = "1"
    os.environ["TORCHINDUCTOR_AUTOGRAD_CACHE"] = "1"


def autotune_cache_dir(compile_cache: Path) -> Path:
    """The per-fusion autotuning folder JAX gives XLA inside its compilation cache."""
    return compile_cache / "jax" / "xla_gpu_per_fusion_autotune_cache_dir"


def autotune_store_path(folder: Path, device_slug: str) -> Path:
    return folder / f"{device_slug}.tar.gz"


def read_autotune_store(store: Path) -> dict[str, bytes]:
    """`store`'s entries, relative file name -> contents (empty when there is no store)."""
    if not store.exists():
        return {}
    with tarfile.open(store) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


def seed_autotune(store: Path, cache: Path) -> int:
    """Write `store`'s entries into the autotuning folder `cache`, keeping entries already
    there; returns how many were written (0 when there is no store for this device)."""
    written = 0
    for name, data in read_autotune_store(store).items():
        path = cache / name
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            written += 1
    return written
