"""The `input` suite's quick run on the CPU, in-process."""

from __future__ import annotations

import json
import time

import jax
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
    assert cpu["cpu_cores_used"] > 0 and cpu["cpu_steal_cores"] >= 0
    assert json.loads(res.path.read_text())["host_cpu"]
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
    """The device idles before a step from the end of the step before it to when the loop
    called it; a step called before the one before it ended counts none."""
    timeline = input_pipeline.StepTimeline()
    timeline.extend((0.0, float(t)) for t in range(1, 9))
    timeline.step_called.extend([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0])
    timeline.step_done.extend([1.5, 2.5, 3.996, 4.5, 7.5, 7.9, 8.9, 9.9])
    figures = input_pipeline.timeline_figures(timeline, rows=10, skip=2)
    assert [step[2] for step in figures["timeline_ms"]] == [0.0, 500.0, 500.0, 4.0, 500.0, 0, 0, 0]
    assert figures["device_idle_ms"] == 1004.0 and figures["device_idle_steps"] == 3
    assert "step_call_ms" not in figures  # no returns recorded
    timeline.step_returned.extend([1.1, 2.002, 3.003, 4.004, 5.5, 6.001, 7.001, 8.001])
    figures = input_pipeline.timeline_figures(timeline, rows=10, skip=2)
    assert figures["step_call_ms"] == [2.0, 500.0]  # median and longest after step 2


def test_the_step_timeline_times_the_batches_and_the_steps_the_loop_runs():
    """Through `data.prefetch_to_device` and a parallel form's `compile_train`, as `fit` uses
    them: each batch's wait, each step's call and end (a host that sleeps between steps leaves
    the device idle for that long), and the functions restored."""
    from flax_attention.training import parallel

    original = input_pipeline.data.prefetch_to_device
    form = parallel.make_parallel("none")
    with input_pipeline.step_timeline() as timeline:
        batches = input_pipeline.data.prefetch_to_device(
            iter([(np.zeros(4, np.float32), i) for i in range(5)]), lambda batch: batch
        )
        step = form.compile_train(lambda state, batch, **_: (state + 1, {"loss": batch.sum()}))
        state = form.put_state(np.float32(0))
        for batch, _ in batches:
            state, metrics = step(state, form.put_batch({"x": batch})["x"])
            jax.block_until_ready(metrics)
            time.sleep(0.05)
    assert input_pipeline.data.prefetch_to_device is original
    assert form.compile_train.__func__ is parallel.MeshForm.__dict__["compile_train"]
    assert len(timeline) == len(timeline.step_called) == len(timeline.step_done) == 5
    assert len(timeline.step_returned) == 5
    assert all(d >= c for c, d in zip(timeline.step_called, timeline.step_done, strict=True))
    figures = input_pipeline.timeline_figures(timeline, rows=4, skip=1)
    assert all(step[2] >= 45.0 for step in figures["timeline_ms"][1:])


def test_steady_cpu_gives_busy_and_steal_cores_over_the_stretch(tmp_path):
    from benchmarks.cpu_usage import SteadyCpu

    cpu = SteadyCpu(tmp_path / "metrics.jsonl", first=2, last=4)
    assert cpu.cores is None and cpu.steal_cores is None
    cpu.marks = {1: (10.0, 100.0, 1.0), 4: (14.0, 120.0, 3.0)}
    assert cpu.cores == 5.0 and cpu.steal_cores == 0.5
