"""One-off measurements behind choices the library makes, kept runnable.

Each is `python -m benchmarks.lab.experiments.<name> [--quick] [--out DIR]` and writes
`<out>/<name>.json` (by default under benchmarks/lab/experiments/results/<device>/). They time the
library through its public arguments; the suites users run are in the folder above.

- `psa_convs`: PSA's branch convolutions in each formulation (`branch_convs.FORMULATIONS`),
  the measurements behind the PSA rows of `layers.policy`.
- `xla_flags`: the train suite's step under other XLA GPU flags (CUDA graphs, cuBLAS GEMMs),
  a process per variant; none measured faster (docs/measurements.md, 2026-12-06).
- `bn_statistics`: the train suite's step with BatchNorm's one-pass statistics against the
  two passes they replaced (docs/measurements.md, 2026-12-06).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax

from benchmarks.device import device_slug, versions

RESULTS = Path(__file__).resolve().parent / "results"


def write_record(name: str, rows: list[dict], out: Path | None, quick: bool) -> Path:
    """Write experiment `name`'s rows, with the device, versions and time, to
    `<out>/<name>.json` (`out` by default RESULTS/<device>); returns the file. The device is
    first asked for here, so a parent that runs its variants in child processes holds no GPU
    while they run."""
    out = out or RESULTS / device_slug(quick)
    out.mkdir(parents=True, exist_ok=True)
    record = {
        "experiment": name,
        "device": jax.devices()[0].device_kind,
        "versions": versions(),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "rows": rows,
    }
    path = out / f"{name}.json"
    path.write_text(json.dumps(record, indent=1) + "\n")
    return path
