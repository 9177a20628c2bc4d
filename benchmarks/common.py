"""Shared benchmark machinery: timing, device facts, copy bandwidth, JSON rows and PNG charts.

Timing rules: warm-up calls are excluded (compilation, autotuning, allocator growth),
every sample ends with a device sync (`block_until_ready` / `torch.cuda.synchronize`), each sample
runs `inner` back-to-back calls that rotate over several distinct random input sets (so caches
do not flatter a repeated buffer; never zeros), and we report the median with p10/p90 over many
samples, per call.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
PACKAGES = ("jax", "jaxlib", "flax", "optax", "numpy", "torch", "timm", "triton")


@dataclass
class Settings:
    """How hard to measure. `quick` is the CPU smoke mode: tiny shapes, few samples."""

    quick: bool = False
    samples: int = 30
    warmup: int = 3
    sample_ms: float = 20.0  # target duration of one sample (inner calls are sized to it)
    inputs: int = 4  # distinct input sets rotated through
    out_dir: Path = RESULTS
    warm_only: bool = False  # compile and run each case once, time nothing (benchmarks/warm.py)

    @classmethod
    def make(cls, quick: bool, out_dir: Path | None = None) -> Settings:
        s = cls(quick=quick, out_dir=out_dir or RESULTS)
        if quick:
            s.samples, s.warmup, s.sample_ms, s.inputs = 3, 1, 1.0, 2
        return s


@dataclass
class Timing:
    """Per-call milliseconds over samples."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    samples: int
    inner: int

    def as_dict(self) -> dict[str, float | int]:
        return {
            "median_ms": round(self.median_ms, 5),
            "p10_ms": round(self.p10_ms, 5),
            "p90_ms": round(self.p90_ms, 5),
            "samples": self.samples,
            "inner": self.inner,
        }


def time_fn(
    fn: Callable[..., Any],
    inputs: Sequence[tuple],
    sync: Callable[[Any], None],
    settings: Settings,
) -> Timing:
    """Time `fn(*inputs[i])` rotating over `inputs`; `sync(out)` waits for the device.

    With `settings.warm_only`, `fn` runs once and the timing is NaN."""
    if settings.warm_only:
        sync(fn(*inputs[0]))
        return Timing(float("nan"), float("nan"), float("nan"), 0, 0)
    n = len(inputs)
    out = None
    for i in range(settings.warmup):
        out = fn(*inputs[i % n])
    sync(out)
    t0 = time.perf_counter()
    out = fn(*inputs[0])
    sync(out)
    one_ms = max((time.perf_counter() - t0) * 1e3, 1e-3)
    inner = max(1, min(200, round(settings.sample_ms / one_ms)))
    per_call = []
    for _ in range(settings.samples):
        t0 = time.perf_counter()
        for i in range(inner):
            out = fn(*inputs[i % n])
        sync(out)
        per_call.append((time.perf_counter() - t0) * 1e3 / inner)
    p10, med, p90 = np.percentile(per_call, [10, 50, 90])
    return Timing(float(med), float(p10), float(p90), settings.samples, inner)


@jax.jit
def _leaf_rel_error(a: jax.Array, b: jax.Array) -> jax.Array:
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    return jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-30)


def max_rel_error(out: Any, ref: Any) -> float:
    """Largest |out - ref| over the leaves of two same-structured pytrees, each relative to that
    leaf's largest |ref|; computed on the device."""
    errors = [
        _leaf_rel_error(a, b)
        for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref), strict=True)
        if b.size
    ]
    return max((float(e) for e in errors), default=0.0)


def jax_sync(out: Any) -> None:
    jax.block_until_ready(out)


def torch_sync(_: Any) -> None:
    import torch

    torch.cuda.synchronize()


def random_inputs(shape: Sequence[int], dtype, count: int, seed: int = 0) -> list[jax.Array]:
    """`count` distinct standard-normal device arrays (never zeros)."""
    keys = jax.random.split(jax.random.key(seed), count)
    return [jax.random.normal(k, tuple(shape), jnp.float32).astype(dtype) for k in keys]


CACHE_PARTS = ("jax", "inductor", "triton", "warm")  # what the benchmarks write in a cache


def clear_caches(cache_dir: Path) -> None:
    """Delete the benchmarks' own folders in `cache_dir` (`CACHE_PARTS`); anything else
    there is left alone."""
    for part in CACHE_PARTS:
        shutil.rmtree(cache_dir / part, ignore_errors=True)


def stop_processes(processes: Iterable[subprocess.Popen], grace_s: float = 5.0) -> None:
    """Terminate the processes still running, give them `grace_s` seconds to exit, then kill
    those left; returns once every one has exited."""
    running = [p for p in processes if p.poll() is None]
    for proc in running:
        proc.terminate()
    deadline = time.monotonic() + grace_s
    for proc in running:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


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


def torch_compile(module: Any) -> Any:
    """`torch.compile(module)` after clearing Dynamo's per-code caches, so compiles of earlier
    cases never count against its recompile limit (the compiled artifacts stay cached)."""
    import torch

    torch._dynamo.reset()
    return torch.compile(module)


# ---------------------------------------------------------------------------------------------
# Device and versions


def platform_name() -> str:
    return jax.devices()[0].platform


def device_name() -> str:
    d = jax.devices()[0]
    return d.device_kind if d.platform != "cpu" else f"cpu ({platform.processor() or 'x86_64'})"


def gpu_memory_gb() -> float:
    """GB of device memory that processes may share: 85% of a CUDA device's total, else JAX's
    allocator limit (16 where the platform does not say)."""
    torch = torch_cuda()
    if torch is not None:
        return 0.85 * torch.cuda.mem_get_info()[1] / 2**30
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("bytes_limit", 16 * 2**30) / 2**30


def device_slug(quick: bool = False) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", device_name().lower()).strip("-")
    return f"{slug}-quick" if quick else slug


def versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0]}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    try:
        import torch

        out["torch_cuda"] = str(torch.version.cuda)
    except ImportError:
        pass
    return out


def torch_cuda() -> Any | None:
    """The torch module when torch and a CUDA device are available, else None."""
    try:
        import torch
    except ImportError:
        return None
    return torch if torch.cuda.is_available() else None


# ---------------------------------------------------------------------------------------------
# Copy bandwidth


def copy_bandwidth(settings: Settings) -> dict[str, float]:
    """Device-to-device copy bandwidth in GB/s (bytes read + bytes written), JAX and torch."""
    if settings.warm_only:
        return {"gbps": float("nan")}
    size = 2**20 if settings.quick else 2**30  # elements of bf16: 2 GiB moved per copy
    xs = random_inputs((size,), jnp.bfloat16, 2, seed=123)
    copy = jax.jit(lambda x: -x)  # one read, one write; a plain copy can be elided
    t = time_fn(copy, [(x,) for x in xs], jax_sync, settings)
    out = {"jax_gbps": 2 * size * 2 / t.median_ms / 1e6}
    torch = torch_cuda()
    if torch is not None:
        a = [torch.randn(size, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
        b = torch.empty_like(a[0])
        t = time_fn(lambda x: b.copy_(x), [(x,) for x in a], torch_sync, settings)
        out["torch_gbps"] = 2 * size * 2 / t.median_ms / 1e6
        del a, b
    out["gbps"] = max(out.values())
    return out


# ---------------------------------------------------------------------------------------------
# Results


@dataclass
class Results:
    """Rows of one suite, written after every row so a killed run keeps what it measured."""

    suite: str
    settings: Settings
    meta: dict[str, Any] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)
    last_add: float = field(default_factory=time.perf_counter)  # for each row's wall time

    @property
    def path(self) -> Path:
        return self.settings.out_dir / device_slug(self.settings.quick) / f"{self.suite}.json"

    def add(self, row: dict[str, Any]) -> None:
        """Append `row` with `row_wall_s`, the seconds since the previous row (or the start)."""
        now, wall = time.perf_counter(), round(time.perf_counter() - self.last_add, 1)
        self.last_add = now
        self.rows.append({"suite": self.suite, **row, "row_wall_s": wall})
        print(format_row(self.rows[-1]), flush=True)
        self.write()

    def write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        doc = {
            "suite": self.suite,
            "device": device_name(),
            "platform": platform_name(),
            "device_count": jax.device_count(),
            "versions": versions(),
            "quick": self.settings.quick,
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **self.meta,
            "rows": self.rows,
        }
        self.path.write_text(json.dumps(doc, indent=1) + "\n")


def format_row(row: dict[str, Any]) -> str:
    keys = ("name", "impl", "framework", "spatial_conv", "mode", "shape", "batch", "n_devices")
    head = " ".join(str(row[k]) for k in keys if k in row)
    if "error" in row:
        return f"{head:70s} ERROR {row['error'][:200]}"
    vals = []
    if "median_ms" in row:
        vals.append(f"{row['median_ms']:.3f} ms [{row['p10_ms']:.3f}, {row['p90_ms']:.3f}]")
    for k, fmt in (
        ("img_per_s", "{:.0f} img/s"),
        ("bw_frac", "{:.0%} of copy bw"),
        ("tflops", "{:.1f} TFLOP/s"),
        ("compile_s", "compile {:.1f}s"),
    ):
        if row.get(k) is not None:
            vals.append(fmt.format(row[k]))
    return f"{head:70s} " + "  ".join(vals)


def read_result(path: Path, suite: str) -> dict[str, Any]:
    """The JSON a `suite` run wrote at `path`; a file that is missing, unreadable or of another
    suite stops the program with one line naming it (exit status 2)."""
    try:
        result = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        print(f"error: cannot read {path}: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    if not isinstance(result, dict) or result.get("suite") != suite:
        found = result.get("suite") if isinstance(result, dict) else None
        print(f"error: {path} is not a {suite} suite result (suite: {found})", file=sys.stderr)
        raise SystemExit(2)
    return result


def error_text(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:500]


def chart(path: Path, suite: str, rows: list[dict[str, Any]]) -> Path | None:
    """A grouped bar chart of one suite's rows (PNG next to the JSON); None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    spec = CHARTS[suite]
    rows = [r for r in rows if r.get(spec["value"]) is not None]
    if not rows:
        return None
    groups = list(dict.fromkeys(spec["group"](r) for r in rows))
    series = list(dict.fromkeys(spec["series"](r) for r in rows))
    fig, ax = plt.subplots(figsize=(max(8, 0.6 * len(groups) * max(1, len(series)) / 2), 5))
    width = 0.8 / max(1, len(series))
    for i, s in enumerate(series):
        vals = []
        for g in groups:
            match = [
                r[spec["value"]] for r in rows if spec["group"](r) == g and spec["series"](r) == s
            ]
            vals.append(match[0] if match else 0.0)
        ax.bar(np.arange(len(groups)) + i * width, vals, width, label=s)
    ax.set_xticks(
        np.arange(len(groups)) + 0.4 - width / 2, groups, rotation=45, ha="right", fontsize=7
    )
    ax.set_ylabel(spec["label"])
    ax.set_title(f"{suite} on {device_name()}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    out = path.with_suffix(".png")
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _series(r: dict[str, Any]) -> str:
    """A row's bar series: its `impl` (input and scaling suites, older results) or framework,
    with the spatial-conv formulation where it has one."""
    return r.get("impl") or " ".join(filter(None, (r.get("framework"), r.get("spatial_conv"))))


CHARTS: dict[str, dict[str, Any]] = {
    "modules": {
        "value": "bw_frac",
        "label": "fraction of copy bandwidth at minimal bytes (PSA: TFLOP/s / 100)",
        "group": lambda r: f"{r['name']} {r['mode']} {r['shape'][1]}x{r['shape'][3]}",
        "series": _series,
    },
    "train": {
        "value": "img_per_s",
        "label": "images / s (training step)",
        "group": lambda r: r["name"],
        "series": _series,
    },
    "input": {
        "value": "img_per_s",
        "label": "images / s (host: per CPU core)",
        "group": lambda r: r["name"],
        "series": _series,
    },
    "scaling": {
        "value": "img_per_s_per_device",
        "label": "images / s per device",
        "group": lambda r: f"{r['name']} x{r['n_devices']}",
        "series": _series,
    },
}


_COLLECTIVE = re.compile(
    r"\s(all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)(?:-start)?\("
)


def count_collectives(hlo_text: str) -> dict[str, int]:
    """Collective ops in an HLO module's text (`compiled.as_text()`), by kind, plus "total";
    an asynchronous pair (`all-reduce-start`/`-done`) counts once."""
    counts: dict[str, int] = {}
    for match in _COLLECTIVE.finditer(hlo_text):
        counts[match[1]] = counts.get(match[1], 0) + 1
    return {**dict(sorted(counts.items())), "total": sum(counts.values())}
