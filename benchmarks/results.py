"""Results I/O: a suite's rows as JSON under <out>/<device>/<suite>.json, and reading one back."""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax

from benchmarks.device import device_name, device_slug, platform_name, versions
from benchmarks.settings import Settings


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
