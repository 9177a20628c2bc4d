"""The lab (benchmarks/lab): autotune recording, the profilers, the table writers and the
committed results they read, the multi-process harness and the experiments."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.caches import read_autotune_store, seed_autotune
from benchmarks.lab import autotune, multiprocess, scaling_ablations
from benchmarks.settings import Settings
from benchmarks.tests.test_suites import sleeper

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
TINY = "tiny_se_resnet"  # one SE BasicBlock stage


def test_autotune_store_round_trip_keeps_entries_already_cached(tmp_path):
    measured = tmp_path / "measured"
    (measured / "sub").mkdir(parents=True)
    (measured / "a.textproto").write_text("algorithm: 3")
    (measured / "sub" / "b.pb").write_bytes(b"\x83\x00tiling")
    store = tmp_path / "store" / "gpu.tar.gz"
    assert autotune.save(measured, store) == 2
    (measured / "c.textproto").write_text("algorithm: 1")
    assert autotune.save(measured, store) == 3  # added to, not replaced

    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / "a.textproto").write_text("algorithm: 7")  # this run's own result wins
    assert seed_autotune(store, fresh) == 2
    assert (fresh / "a.textproto").read_text() == "algorithm: 7"
    assert (fresh / "sub" / "b.pb").read_bytes() == b"\x83\x00tiling"
    assert seed_autotune(tmp_path / "store" / "other-gpu.tar.gz", fresh) == 0


def test_record_autotune_compiles_alone_and_writes_the_device_archive(tmp_path):
    """`python -m benchmarks.lab.autotune` on CPU: the shard (resnet18's step) compiles in a
    worker and the device's archive is written (empty: XLA autotunes only on GPUs), nothing is
    timed."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "benchmarks.lab.autotune", "--quick", "--suites", "train"]
    cmd += ["--models", "resnet18", "--autotune-dir", str(tmp_path / "autotune")]
    cmd += ["--out", str(tmp_path / "out"), "--cache", str(tmp_path / "cache")]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    (archive,) = (tmp_path / "autotune").glob("*-quick.tar.gz")
    assert read_autotune_store(archive) == {}
    assert "warm 1/1 train resnet18 flax: ok" in done.stdout
    assert not (tmp_path / "out").exists()


def test_profile_gates_quick_run_lists_every_kernel(tmp_path):
    """`python -m benchmarks.lab.profile_gates --quick` on CPU: one row per gate x shape, each
    with its kernels joined to HLO instructions; CBAM's spatial gate shows its convolutions."""
    from benchmarks import modules
    from benchmarks.lab import profile_gates

    args = ["--quick", "--gates", "se,cbam", "--spatial-convs", "conv", "--steps", "2"]
    profile_gates.main([*args, "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "profile_gates.json").read_text())["rows"]
    assert [(r["name"], r.get("spatial_conv")) for r in rows] == [("se", None)] * 2 + [
        ("cbam", "conv")
    ] * 2
    assert [r["shape"] for r in rows[:2]] == [list(s) for s in modules.QUICK_SHAPES]
    for row in rows:
        assert "error" not in row, row.get("error")
        assert row["kernels"] > 0 and row["device_ms"] > 0
        assert sum(op["launches"] for op in row["ops"]) == row["kernels"]
        assert all(op["category"] != "unmatched" and op["what"] for op in row["ops"])
    convs = [op for op in rows[-1]["ops"] if op["category"] == "conv"]
    assert any("conv_general_dilated" in op["source"] for op in convs)


def test_profile_step_keeps_every_instruction_with_top_zero(tmp_path, monkeypatch):
    """`python -m benchmarks.lab.profile_step --quick --top 0` on CPU: the resnet18 step's every
    instruction, their launches adding up to the step's kernels (the default keeps 25); it turns
    XLA's CUDA graphs off in XLA_FLAGS, keeping the flags it found."""
    from benchmarks.lab import profile_step

    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    profile_step.main(
        ["--quick", "--models", "resnet18", "--steps", "1", "--top", "0", "--out", str(tmp_path)]
    )
    (row,) = json.loads((tmp_path / "profile_step.json").read_text())["rows"]
    assert "error" not in row, row.get("error")
    assert len(row["top"]) > 25
    assert sum(op["launches"] for op in row["top"]) == row["kernels_per_step"]
    assert os.environ["XLA_FLAGS"] == (
        "--xla_force_host_platform_device_count=8 --xla_gpu_enable_command_buffer="
    )


def test_multiprocess_quick_run_with_gpu_decoding_resumes_after_kill_and_matches_one_process(
    tmp_path,
):
    """Two CPU processes (2 devices each) decode photo-like JPEGs as `--decoder gpu` does (the
    GPU decoder's CPU stand-in on each device), train, are killed after a checkpoint, resume and
    finish with the parameters of one process on 4 devices: each device decodes and trains on
    the same rows in both runs, only the cross-process gradient sums round in another order."""
    out = tmp_path / "result.json"
    argv = ["--quick", "--decoder", "gpu", "--workdir", str(tmp_path / "run"), "--out", str(out)]
    assert multiprocess.main(argv) == 0
    result = json.loads(out.read_text())
    assert result["pass"] and result["processes"] == 2
    assert result["decoder"] == "gpu" and result["decoder_stand_in"] is True
    assert result["dataset"]["name"] == "imagenet2012"
    assert 0 < result["resumed_from_step"] < result["steps"] == 12
    assert result["resumed_from_step"] >= result["killed_after_checkpoint"]
    assert result["max_abs_param_diff"] < 1e-5
    assert all(v > 0 for v in result["img_per_s"].values())


def test_multiprocess_job_stops_its_processes_and_closes_their_logs_on_error(tmp_path, monkeypatch):
    start, started = sleeper(subprocess.Popen)
    monkeypatch.setattr(multiprocess.subprocess, "Popen", start)
    args = argparse.Namespace(
        processes=2,
        quick=True,
        decoder="cpu",
        dataset="digits",
        model=TINY,
        image_size=16,
        per_device_batch=4,
        steps=2,
        checkpoint_every=1,
        precision="fp32",
        data_dir=tmp_path / "tfds",
        timeout=0.5,
        train_argv=[],
    )
    job = multiprocess.Job(args, tmp_path / "run", distributed=True)
    job.start()
    with pytest.raises(subprocess.TimeoutExpired):
        job.wait()
    assert len(started) == 2
    for proc, log in started:
        assert proc.poll() is not None and log.closed


@pytest.mark.parametrize("device", ["nvidia-h200", "nvidia-h100-80gb-hbm3"])
def test_policy_spatial_conv_rows_are_the_committed_measurements(device):
    """The spatial-conv rows of `layers.policy.TABLES` for a result's device kind are what
    benchmarks.lab.auto_table derives from its committed modules.json: the H200's rows, and none
    for the H100, whose run timed the library conv alone."""
    from benchmarks.lab import auto_table
    from flax_attention.layers import policy

    result = json.loads((auto_table.RESULTS / device / "modules.json").read_text())
    table = policy.device_table(result["device"])
    committed = {gate: table[gate].rows for gate in auto_table.SPATIAL_GATES if gate in table}
    assert auto_table.fastest_formulations(result["rows"]) == committed
    assert bool(committed) == (device == "nvidia-h200")


def test_auto_spatial_conv_table_reads_the_spatial_conv_rows_of_later_runs():
    """Rows that name their formulation in `spatial_conv` (runs after the gates' `impl` was
    removed) give the same table as the committed rows that named it in `impl` labels."""
    from benchmarks.lab import auto_table

    old = json.loads(auto_table.SOURCE.read_text())["rows"]
    new = []
    for row in old:
        form = auto_table.spatial_conv_of(row)
        if row.get("framework") == "flax" and form is not None:
            new.append({k: v for k, v in row.items() if k != "impl"} | {"spatial_conv": form})
    assert any(row["spatial_conv"] == "auto" for row in new)
    assert auto_table.fastest_formulations(new) == auto_table.fastest_formulations(old)


@pytest.mark.parametrize(
    ("module", "suite"),
    [("benchmarks.lab.headline", "train"), ("benchmarks.lab.auto_table", "modules")],
)
def test_table_writers_refuse_a_missing_or_wrong_result_in_one_line(
    module, suite, tmp_path, capsys
):
    main = importlib.import_module(module).main
    wrong = tmp_path / "other.json"
    wrong.write_text(json.dumps({"suite": "input", "rows": []}))
    for path, needle in ((tmp_path / "missing.json", "cannot read"), (wrong, "not a")):
        with pytest.raises(SystemExit) as stop:
            main([str(path)])
        assert stop.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0]
        assert str(path) in err[0]
    assert f"not a {suite} suite result (suite: input)" in err[0]


def test_headline_table_is_the_one_its_train_result_gives():
    """The README's training-speed table is `python -m benchmarks.lab.headline` of the result file
    its caption names, so every number in it comes from one committed run."""
    from benchmarks.lab.headline import headline

    text = README.read_text()
    named = re.findall(r"Training step on one .*?`(benchmarks/results/[^`]+/train\.json)`", text)
    assert len(named) == 1, named
    source = Path(named[0])
    result = json.loads((README.parent / source).read_text())
    assert headline(result, source) in text


def test_spatial_convs_experiment_swaps_one_stage_of_the_table_at_a_time(monkeypatch):
    """The experiment's cases: the device's table, then each stage with each other
    formulation; the rule it builds the model with picks the swapped entry at every stage,
    and the library's tables are left as they were."""
    from benchmarks.lab.experiments import spatial_convs
    from flax_attention.layers import policy, tap_convs

    monkeypatch.setattr(policy, "device_kind", lambda: "NVIDIA H200")
    sizes = spatial_convs.stage_sizes(224)
    assert sizes == (56, 28, 14, 7)
    before = {kind: dict(table) for kind, table in policy.TABLES.items()}
    (first, library), *swaps = spatial_convs.cases(sizes, "cbam", len(sizes))
    assert first is None and library == {h * h: "shifts" for h in sizes}
    assert len(swaps) == len(sizes) * (len(tap_convs.FORMULATIONS) - 1)
    for stage, choices in swaps:
        changed = [hw for hw in choices if choices[hw] != library[hw]]
        assert changed == [sizes[stage - 1] ** 2]
        rule = spatial_convs.stage_rule(choices)
        assert [policy.resolve("cbam", rule, h * h) for h in sizes] == [
            choices[h * h] for h in sizes
        ]
    assert before == {kind: dict(table) for kind, table in policy.TABLES.items()}


@pytest.mark.parametrize(
    "module, args",
    [
        ("benchmarks.lab.experiments.spatial_convs", ["--models", "cbam_resnet50,resnet50"]),
        ("benchmarks.lab.experiments.spatial_convs", ["--models", ","]),
        ("benchmarks.lab.profile_step", ["--top", "-1"]),
    ],
)
def test_bad_arguments_exit_2_and_write_nothing(tmp_path, capsys, module, args):
    """A model the experiment does not sweep, no model, or a negative --top: one usage line,
    exit status 2, before any output folder is made."""
    main = importlib.import_module(module).main
    with pytest.raises(SystemExit) as info:
        main([*args, "--quick", "--out", str(tmp_path / "out")])
    assert info.value.code == 2
    assert "error: --" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_scaling_ablations_add_their_rows_and_profile_the_largest_count(tmp_path):
    """The lab's scaling run on 2 simulated CPU devices: the suite's forms and the ablations,
    the shard_map jit step with fewer collectives than the SPMD one, per-replica BatchNorm
    leaving only the gradients' all-reduce, and the profiles of the largest count."""
    res = scaling_ablations.run(Settings.make(True, tmp_path), counts=(2,))
    rows = {r["impl"]: r for r in res.rows}
    assert list(rows) == list(scaling_ablations.VARIANTS)
    assert all("error" not in r and r["img_per_s"] > 0 for r in res.rows)
    collectives = {impl: row["collectives"] for impl, row in rows.items()}
    assert collectives["jit"]["total"] < collectives["jit_spmd"]["total"]
    assert collectives["pmap_local_bn"] == {"all-reduce": 1, "total": 1}
    profiles = {p["impl"]: p for p in res.meta["profiles"]}
    assert list(profiles) == list(scaling_ablations.PROFILED)
    assert profiles["jit"]["n_devices"] == 2 and profiles["jit"]["top_collectives"]
    assert "collective" in profiles["jit"]["categories_all_devices"]
    assert json.loads(res.path.read_text())["profiles"] == res.meta["profiles"]


def test_stall_probe_lists_what_happened_inside_each_slow_step():
    """A step over `slow` x the median interval gets the training thread's stacks sampled in
    it, the collections and compiles that ran then, and the longest gap between samples."""
    import gc

    from benchmarks.lab import stall_probe

    timeline = [(0.0, 0.0), (0.0, 1.0), (0.0, 1.1), (0.0, 1.2), (0.0, 1.3), (0.01, 1.8), (0.0, 1.9)]
    with stall_probe.probes(sample_ms=1.0) as (sampler, compiles, collections, triggers):
        gc.collect()
    assert any(g == "gen2" for _, g, _ in collections)
    assert triggers and triggers[0][1] == "MainThread"
    sampler.samples = [(1.35, "loop.py:train"), (1.36, "loop.py:train"), (1.75, "gc")]
    collections = [(1.4, "gen2", 0.3), (0.5, "gen2", 0.2)]
    compiles = [(1.5, "Compiling jit(add)", 0.0)]
    row = {
        "timeline_ms": [[0.0, 0.0, 0.0]] * 5 + [[10.0, 500.0, 420.0], [0.0, 100.0, 0.0]],
        "gpu_samples_ms": [[1200.0, 0, 99, 1980, 400.0, 60, 0], [1500.0, 0, 3, 1980, 90.0, 58, 1]],
    }
    slow = stall_probe.slow_steps(timeline, sampler, compiles, collections, slow=2.5, row=row)
    assert [s["step"] for s in slow] == [5]  # 500 ms against a 100 ms median
    step = slow[0]
    assert step["device_idle_ms"] == 420.0
    assert step["gpu"] == [[200.0, 0, 3, 1980, 90.0, 58, 1]]  # the sample inside the step
    assert step["interval_ms"] == 500.0 and step["wait_ms"] == 10.0 and step["samples"] == 3
    assert step["stacks"][0] == ("loop.py:train", 2)
    assert step["largest_sample_gap_ms"] == 390.0
    assert step["collections"] == [(100.0, "gen2", 300.0)]
    assert step["compiles"] == [(200.0, "Compiling jit(add)", 0.0)]


def test_stall_probe_sums_py_spy_samples_by_the_thread_holding_the_gil(tmp_path):
    from benchmarks.lab import stall_probe

    raw = tmp_path / "py_spy_base.txt"
    raw.write_text(
        "thread (1): MainThread;train (loop.py:294);__call__ (pjit.py:10) 7\n"
        "thread (2): decode_0;decode (gpu_decode.py:80);_resample (gpu_decode.py:120) 5\n"
        "thread (1): MainThread;train (loop.py:294);_check (loop.py:350) 2\n"
        "not a sample line\n"
    )
    spy = stall_probe.GilHolders("py-spy", raw, timeline=[], after_steps=0, seconds=1)
    summary = spy.summary()
    assert summary["samples"] == 14
    assert summary["threads"] == [("MainThread", 9), ("decode_0", 5)]
    main_frames = summary["frames"]["MainThread"]
    assert main_frames[0] == ("__call__ (pjit.py:10) < train (loop.py:294)", 7)
    spy.error = "ptrace: Operation not permitted"
    assert spy.summary() == {"error": "ptrace: Operation not permitted"}
