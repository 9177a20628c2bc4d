"""The busy CPU cores (those this process may run on) over a steady stretch of a training run."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import psutil


class SteadyCpu:
    """The busy CPU cores among those this process may run on (its affinity, e.g. under
    ``taskset``: all processes there count, this one, its threads, grain's workers) while a training run logs windows ``first`` to ``last``
    (1-based) to ``metrics``: past compilation and start-up, like the images/s reported."""

    def __init__(self, metrics: Path, first: int, last: int):
        self.metrics, self.first, self.last = metrics, first, last
        self.marks: dict[int, tuple[float, float, float]] = {}
        self.cpus = psutil.Process().cpu_affinity()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)

    def _windows(self) -> int:
        if not self.metrics.exists():
            return 0
        return self.metrics.read_text().count('"images_per_s"')

    def _watch(self) -> None:
        while not self.stop.wait(0.05):
            count = self._windows()
            for mark in (self.first - 1, self.last):
                if count >= mark and mark not in self.marks:
                    self.marks[mark] = (time.perf_counter(), *self._busy_and_steal_seconds())

    def __enter__(self) -> SteadyCpu:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()

    def _busy_and_steal_seconds(self) -> tuple[float, float]:
        every_cpu = psutil.cpu_times(percpu=True)
        per_cpu = [every_cpu[i] for i in self.cpus]
        return sum(_busy(t) for t in per_cpu), sum(getattr(t, "steal", 0.0) for t in per_cpu)

    def _rate(self, column: int) -> float | None:
        if len(self.marks) < 2:
            return None
        start, end = self.marks[self.first - 1], self.marks[self.last]
        return (end[column] - start[column]) / max(end[0] - start[0], 1e-9)

    @property
    def cores(self) -> float | None:
        """Busy cores over the stretch (steal included), None before it ended."""
        return self._rate(1)

    @property
    def steal_cores(self) -> float | None:
        """Cores' worth of time the hypervisor ran something else while this machine's threads
        were ready to run (Linux steal time), over the stretch; None before it ended."""
        return self._rate(2)


def _busy(times: Any) -> float:
    """Busy seconds in one `psutil.cpu_times` record (guest time is already in user time)."""
    return times.user + times.nice + times.system + times.irq + times.softirq + times.steal
