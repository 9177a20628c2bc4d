"""`GpuSamples`: nvidia-smi's samples of the GPUs while a row runs, on the CPU machine through
a stand-in nvidia-smi script."""

from __future__ import annotations

import os
import stat
import time

import pytest

from benchmarks.gpu_samples import GpuSamples, parse_sample

# Knows only the older name of the reasons field, as older drivers do; two GPU states.
STAND_IN = """#!/bin/bash
case "$*" in *clocks_event_reasons*) echo "Field is not a valid field to query." >&2; exit 2;; esac
sample() { echo "0, 97, 1980, 650.50, 61, 0x0000000000000000"; echo "0, 40, 1755, 700.00, 70, 0x0000000000000005"; }
case "$*" in *--loop-ms=*) while true; do sample; sleep 0.01; done;; *) sample;; esac
"""


def _stand_in(tmp_path, monkeypatch, script: str = STAND_IN) -> None:
    smi = tmp_path / "nvidia-smi"
    smi.write_text(script)
    smi.chmod(smi.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")


def test_parse_sample_reads_a_line_with_and_without_the_reasons():
    assert parse_sample("0, 97, 1980, 650.50, 61, 0x0000000000000004") == [
        0,
        97,
        1980,
        650.5,
        61,
        4,
    ]
    assert parse_sample("1, 0, 345, 70.1, 30") == [1, 0, 345, 70.1, 30]


@pytest.mark.parametrize("line", ["0, [N/A], 1980, 650.50, 61", "0, 97", "", "GPU 0: H100"])
def test_parse_sample_refuses_what_is_not_a_sample(line):
    assert parse_sample(line) is None


def test_the_gpus_are_sampled_with_the_fields_nvidia_smi_knows(tmp_path, monkeypatch):
    _stand_in(tmp_path, monkeypatch)
    with GpuSamples(period_ms=10) as gpu:
        start = time.perf_counter()
        time.sleep(0.3)
    figures = gpu.figures(start)
    assert len(gpu.samples) >= 4
    clock, utilization = figures["gpu_sm_clock_mhz"], figures["gpu_utilization_pct"]
    assert clock[0] == 1755 and clock[2] == 1980 and 1755 <= clock[1] <= 1980
    assert utilization[0] == 40 and utilization[2] == 97 and 40 <= utilization[1] <= 97
    assert figures["gpu_clock_event_reasons"] == ["0x4"]  # idle (0x1) is not a slowdown
    assert all(len(s) == 7 for s in figures["gpu_samples_ms"])
    count = len(gpu.samples)
    time.sleep(0.1)
    assert len(gpu.samples) == count  # stopped on exit


def test_without_nvidia_smi_nothing_is_sampled(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with GpuSamples() as gpu:
        start = time.perf_counter()
    assert gpu.samples == [] and gpu.figures(start) == {}


def test_an_nvidia_smi_that_answers_no_sample_is_not_polled(tmp_path, monkeypatch):
    _stand_in(tmp_path, monkeypatch, "#!/bin/bash\necho 'No devices were found'\n")
    with GpuSamples(period_ms=10) as gpu:
        time.sleep(0.05)
    assert gpu.samples == [] and gpu._process is None


def test_the_summary_counts_only_the_samples_within_the_steady_span():
    """Samples taken while the step compiled (an idle GPU) are listed but not summarised."""
    gpu = GpuSamples()
    gpu.samples = [
        (10.0, [0, 0, 1980, 80.0, 40, 0x1]),  # compiling
        (11.0, [0, 100, 1980, 650.0, 55, 0x0]),
        (12.0, [0, 100, 1755, 700.0, 60, 0x4]),
        (13.0, [0, 0, 1980, 80.0, 45, 0x1]),  # evaluating after the steps
    ]
    figures = gpu.figures(start=10.0, steady=(10.5, 12.5))
    assert figures["gpu_utilization_pct"] == [100, 100, 100]
    assert figures["gpu_sm_clock_mhz"] == [1755, 1867.5, 1980]
    assert len(figures["gpu_samples_ms"]) == 4 and figures["gpu_samples_ms"][1][0] == 1000.0
