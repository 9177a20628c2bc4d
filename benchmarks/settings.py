"""Where the suites write their results and how hard they measure."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
TPU_AOT_RESULTS = RESULTS / "tpu-aot"  # not per device: compiled for TPU slices on any host


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
