"""The GPUs' utilisation, SM clock, power, temperature and clock event reasons, sampled by
`nvidia-smi` while a benchmark row runs: beside a step timeline they tell a device that slowed
(its clock fell, a power or thermal limit) from one left idle by a host that held the loop."""

from __future__ import annotations

import math
import shutil
import statistics
import subprocess
import threading
import time
from typing import Any

PERIOD_MS = 50  # nvidia-smi's polling period
BASE_FIELDS = ("index", "utilization.gpu", "clocks.sm", "power.draw", "temperature.gpu")
# The bitmask of why the clocks are held down (older drivers know only the second name).
REASON_FIELDS = ("clocks_event_reasons.active", "clocks_throttle_reasons.active")
IDLE_REASON = 0x1  # nothing to run: not a slowdown


def parse_sample(line: str) -> list[float | int] | None:
    """One line of `nvidia-smi --query-gpu=<BASE_FIELDS>[,<a reason field>] --format=csv,
    noheader,nounits` -> [index, utilisation %, SM MHz, watts, celsius(, reasons bitmask)], or
    None for a line that is not one (a field the GPU cannot report reads "[N/A]")."""
    parts = [p.strip() for p in line.split(",")]
    if len(parts) not in (len(BASE_FIELDS), len(BASE_FIELDS) + 1):
        return None
    try:
        values: list[float | int] = [int(parts[0]), int(parts[1]), int(parts[2])]
        values += [float(parts[3]), int(parts[4])]
        if len(parts) > len(BASE_FIELDS):
            values.append(int(parts[5], 16))
    except ValueError:
        return None
    return values


def _command(smi: str, fields: list[str]) -> list[str]:
    """nvidia-smi's command line that prints ``fields`` of every GPU, one line each."""
    return [smi, f"--query-gpu={','.join(fields)}", "--format=csv,noheader,nounits"]


def _query(smi: str) -> list[str] | None:
    """The fields this machine's nvidia-smi answers: BASE_FIELDS and the first reason field it
    knows, else BASE_FIELDS alone; None when it answers neither."""
    for extra in [(field,) for field in REASON_FIELDS] + [()]:
        fields = [*BASE_FIELDS, *extra]
        try:
            out = subprocess.run(
                _command(smi, fields),
                capture_output=True,
                text=True,
                timeout=30,
                check=True,
            ).stdout
        except (OSError, subprocess.SubprocessError):
            continue
        if out.strip() and all(parse_sample(line) for line in out.splitlines() if line.strip()):
            return fields
    return None


class GpuSamples:
    """While active, every GPU is sampled each `period_ms` (`nvidia-smi --loop-ms`); `samples`
    gets (`perf_counter` when read, `parse_sample` values). Nothing is sampled where there is
    no nvidia-smi."""

    def __init__(self, period_ms: int = PERIOD_MS):
        self.period_ms = period_ms
        self.samples: list[tuple[float, list[float | int]]] = []
        self._process: subprocess.Popen | None = None
        self._reader: threading.Thread | None = None

    def __enter__(self) -> GpuSamples:
        smi = shutil.which("nvidia-smi")
        fields = None if smi is None else _query(smi)
        if fields is None:
            return self
        self._process = subprocess.Popen(
            [*_command(smi, fields), f"--loop-ms={self.period_ms}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        return self

    def _read(self) -> None:
        assert self._process is not None and self._process.stdout is not None
        for line in self._process.stdout:
            values = parse_sample(line)
            if values is not None:
                self.samples.append((time.perf_counter(), values))

    def __exit__(self, *exc: Any) -> None:
        if self._process is None:
            return
        self._process.terminate()
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        if self._reader is not None:
            self._reader.join(timeout=10)

    def figures(self, start: float, steady: tuple[float, float] | None = None) -> dict[str, Any]:
        """The samples as `gpu_samples_ms` ([milliseconds since `start` (a `perf_counter`
        time), then the `parse_sample` values] each) with the summary of those within `steady`
        (`perf_counter` times, first and last; all of them without it): SM clock and
        utilisation [min, median, max] and the distinct clock event reasons other than idle
        (hex); {} without samples in it."""
        first, last = steady or (-math.inf, math.inf)
        values = [v for t, v in self.samples if first <= t <= last]
        if not values:
            return {}

        def spread(column: int) -> list[float]:
            column_values = [v[column] for v in values]
            return [min(column_values), statistics.median(column_values), max(column_values)]

        reasons = {v[5] & ~IDLE_REASON for v in values if len(v) > 5} - {0}
        return {
            "gpu_sm_clock_mhz": spread(2),
            "gpu_utilization_pct": spread(1),
            "gpu_clock_event_reasons": [hex(r) for r in sorted(reasons)],
            "gpu_samples_ms": [[round(1e3 * (t - start), 1), *v] for t, v in self.samples],
        }
