"""The `input` suite's quick run on the CPU, in-process."""

from __future__ import annotations

import json

import numpy as np

from benchmarks import input_pipeline
from benchmarks.settings import Settings


def test_input_suite_quick_run_measures_every_host_pipeline_and_trains(tmp_path):
    """`--suites input --quick` on CPU: the photo dataset (with its CMYK, grayscale, PNG and
    large images) is written, every host pipeline is measured (the uint8 ones carry a quarter
    of float32's bytes), the synthetic step and `fit` with the CPU decoder train with a step
    timeline; the GPU rows say why they did not run."""
    res = input_pipeline.run(Settings.make(True, tmp_path))
    rows = {(r["name"], r["impl"]): r for r in json.loads(res.path.read_text())["rows"]}
    host = {impl: rows[("host", impl)] for impl in ("pil-float32", "cpu", "gpu-plan")}
    assert all(r["img_per_cpu_s"] > 0 for r in host.values())
    label = 4  # int32 label per image; the rest is the image, uint8 against float32
    assert (host["cpu"]["bytes_per_img"] - label) * 4 == host["pil-float32"][
        "bytes_per_img"
    ] - label
    assert rows[("train", "synthetic")]["img_per_s"] > 0
    cpu = rows[("train", "cpu")]
    assert cpu["img_per_s"] > 0 and "error" not in cpu and cpu["devices"] == 1
    steps = input_pipeline.QUICK.steps
    assert len(cpu["timeline_ms"]) == steps
    assert all(len(step) == 3 and min(step) >= 0 for step in cpu["timeline_ms"])
    assert cpu["device_idle_ms"] >= 0 and cpu["device_idle_steps"] >= 0
    assert cpu["decoder_peak_mib"] is None
    assert rows[("gpu-decode", "nvimgcodec")]["skipped"] == "no CUDA GPU/nvImageCodec"
    assert rows[("train", "gpu")]["skipped"] == "no CUDA GPU/nvImageCodec"
    assert rows[("train", "hybrid")]["skipped"] == "no CUDA GPU/nvImageCodec"


def test_timeline_figures_weigh_every_step_after_the_first_window():
    stamps = [float(t) for t in range(1, 31)]  # one step a second ...
    stamps[20:] = [t + 4.0 for t in stamps[20:]]  # ... and one step of 5 s at step 21
    timeline = [(0.5, t) for t in stamps]
    figures = input_pipeline.timeline_figures(timeline, rows=10, skip=5)
    assert figures["img_per_s_time_weighted"] == round(10 * 25 / (30 + 4 - 5))
    assert figures["slowest_window_img_per_s"] == round(10 * 10 / 14)
    assert figures["timeline_ms"][20] == [500.0, 5000.0] and figures["timeline_ms"][0][1] == 0.0


def test_timeline_figures_give_the_device_idle_time_before_each_step():
    """The device idles before a step from when the steps before it were done to when the loop
    had its batch; a step whose batch came first counts none."""
    timeline = input_pipeline.StepTimeline()
    timeline.extend((0.0, float(t)) for t in range(1, 9))
    timeline.device_done.extend([0.5, 2.5, 3.0, 3.996, 3.0, 6.0, 7.5, 7.0])
    figures = input_pipeline.timeline_figures(timeline, rows=10, skip=2)
    assert [step[2] for step in figures["timeline_ms"]] == [500.0, 0, 0, 4.0, 2000.0, 0, 0, 1000.0]
    assert figures["device_idle_ms"] == 3004.0 and figures["device_idle_steps"] == 3


def test_the_step_timeline_marks_when_the_device_has_run_the_steps_before_each_batch():
    """Through `data.prefetch_to_device`, as `fit` draws its batches: one device mark per
    batch, each after the loop handed over the batch before it, and the function restored."""
    original = input_pipeline.data.prefetch_to_device
    with input_pipeline.step_timeline() as timeline:
        batches = input_pipeline.data.prefetch_to_device(
            iter([(np.zeros(4), i) for i in range(5)]), lambda batch: batch
        )
        tags = [tag for _, tag in batches]
    assert tags == list(range(5)) and input_pipeline.data.prefetch_to_device is original
    assert len(timeline) == len(timeline.device_done) == 5
    got = [t for _, t in timeline]
    assert all(done >= t for done, t in zip(timeline.device_done, got, strict=True))
