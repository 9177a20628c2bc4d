"""The benchmark runner's machinery: the warm phase's shards and bookkeeping, and one end-to-end
`python -m benchmarks --quick` run on CPU (a worker process compiles, the timed process loads)."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import autotune, multiprocess, scaling, warm
from benchmarks.common import Settings

ROOT = Path(__file__).resolve().parent.parent


def test_shards_solo_first_then_unmeasured_then_longest_and_no_eager_torch(tmp_path):
    last_run = {"train seresnet50 flax": 21.0, "modules psa torch.compile": 67.6}
    last_run |= {"train resnet50 flax": 44.0, "modules se flax": 29.0}
    (tmp_path / "train.json").write_text(json.dumps({"warm": {"shard_s": last_run}}))
    (tmp_path / "input.json").write_text(json.dumps({"rows": []}))  # no warm phase
    seconds = warm.recorded_seconds(tmp_path)
    assert seconds == last_run and warm.recorded_seconds(tmp_path / "none") == {}
    shards = warm.shards(
        ["train", "modules", "input"],
        ["resnet50", "seresnet50", "epsanet50_small"],
        ["se", "psa"],
        ["flax", "torch", "torch.compile"],
        seconds,
    )
    labels = [s.label for s in shards]
    assert labels[0] == "train resnet50 flax" and shards[0].solo
    assert not any(s.solo for s in shards[1:])
    unmeasured = [s for s in shards[1:] if s.est_s is None]
    assert shards[1 : 1 + len(unmeasured)] == unmeasured
    assert labels[-3:] == ["modules psa torch.compile", "modules se flax", "train seresnet50 flax"]
    assert len(labels) == 2 * 3 + 2 * 2  # (flax, torch.compile) x (models + modules)
    assert not any(label.endswith(" torch") for label in labels)
    assert not any(label.startswith("input") for label in labels)
    psa = next(s for s in shards if s.label == "modules psa torch.compile")
    assert psa.args[:6] == (
        "--suites",
        "modules",
        "--modules",
        "psa",
        "--frameworks",
        "torch.compile",
    )
    train_tc = next(s for s in shards if s.label == "train seresnet50 torch.compile")
    assert train_tc.gpu_gb > psa.gpu_gb  # a torch.compile step runs at batch 256


def test_cold_compile_times_are_found_by_row(tmp_path):
    rows = [
        {"name": "seresnet50", "framework": "flax", "compile_s": 12.5},
        {"name": "seresnet50", "framework": "torch", "compile_s": None},
    ]
    shard = tmp_path / "train-seresnet50-flax" / "some-device"
    shard.mkdir(parents=True)
    (shard / "train.json").write_text(json.dumps({"rows": rows}))
    found = warm.cold_compile_s(tmp_path, "train")
    assert found == {warm.row_key(rows[0]): 12.5}
    timed = {"name": "seresnet50", "framework": "flax", "compile_s": 2.0}
    assert found[warm.row_key(timed)] == 12.5
    assert warm.cold_compile_s(tmp_path, "modules") == {}


def test_merge_and_cpu_busy_fraction():
    first = {"wall_s": 10.0, "jobs": 1, "shard_s": {"a": 10.0}, "failed": []}
    then = {"wall_s": 5.5, "jobs": 8, "shard_s": {"b": 5.0}, "failed": [{"shard": "b"}]}
    merged = warm.merge(first, then)
    assert merged["wall_s"] == 15.5 and merged["jobs"] == 8
    assert merged["shard_s"] == {"a": 10.0, "b": 5.0} and merged["failed"] == [{"shard": "b"}]
    # /proc/stat fields: user nice system idle iowait ...; 30 busy of 100
    assert warm.cpu_busy_frac([0] * 8, [20, 0, 10, 60, 10, 0, 0, 0]) == 0.3
    assert warm.cpu_busy_frac(None, [1] * 8) is None


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
    assert autotune.seed(store, fresh) == 2
    assert (fresh / "a.textproto").read_text() == "algorithm: 7"
    assert (fresh / "sub" / "b.pb").read_bytes() == b"\x83\x00tiling"
    assert autotune.seed(tmp_path / "store" / "other-gpu.tar.gz", fresh) == 0


def test_record_autotune_compiles_alone_and_writes_the_device_archive(tmp_path):
    """`--record-autotune` on CPU: the shard compiles in a worker and the device's archive is
    written (empty: XLA autotunes only on GPUs), nothing is timed."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "benchmarks", "--quick", "--record-autotune", "--suites", "train"]
    cmd += ["--models", "resnet50", "--autotune-dir", str(tmp_path / "autotune")]
    cmd += ["--out", str(tmp_path / "out"), "--cache", str(tmp_path / "cache")]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    (archive,) = (tmp_path / "autotune").glob("*-quick.tar.gz")
    assert autotune.read_store(archive) == {}
    assert "warm 1/1 train resnet50 flax: ok" in done.stdout
    assert not (tmp_path / "out").exists()


def test_one_command_run_warms_then_times(tmp_path):
    """The whole runner on CPU: resnet50's step compiles in a worker (cold), then the timed
    process loads it from the persistent cache and reports both compile times."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "benchmarks", "--quick", "--suites", "train"]
    cmd += ["--models", "resnet50", "--frameworks", "flax", "--jobs", "1"]
    cmd += ["--out", str(tmp_path / "out"), "--cache", str(tmp_path / "cache")]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    (path,) = (tmp_path / "out").glob("*/train.json")
    doc = json.loads(path.read_text())
    assert doc["warm"]["failed"] == [] and doc["warm"]["shard_s"].keys() == {"train resnet50 flax"}
    assert doc["warm"]["autotune_seeded"]["entries"] == 0  # no store for a CPU
    (row,) = doc["rows"]
    assert row["name"] == "resnet50" and row["img_per_s"] > 0
    assert row["compile_s"] > row["cached_compile_s"] > 0  # cold in the worker, loaded here
    assert list((tmp_path / "cache" / "jax").iterdir())


def test_input_suite_quick_run_measures_every_host_pipeline_and_trains(tmp_path):
    """`--suites input --quick` on CPU: the photo dataset is written, every host pipeline is
    measured (the uint8 ones carry a quarter of float32's bytes), the synthetic step and `fit`
    with the CPU decoder train; the GPU rows say why they did not run."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "benchmarks", "--quick", "--suites", "input", "--no-warm"]
    cmd += ["--out", str(tmp_path / "out"), "--cache", str(tmp_path / "cache")]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    (path,) = (tmp_path / "out").glob("*/input.json")
    rows = {(r["name"], r["impl"]): r for r in json.loads(path.read_text())["rows"]}
    host = {impl: rows[("host", impl)] for impl in ("pil-float32", "cpu", "gpu-plan")}
    assert all(r["img_per_cpu_s"] > 0 for r in host.values())
    label = 4  # int32 label per image; the rest is the image, uint8 against float32
    assert (host["cpu"]["bytes_per_img"] - label) * 4 == host["pil-float32"][
        "bytes_per_img"
    ] - label
    assert rows[("train", "synthetic")]["img_per_s"] > 0
    assert rows[("train", "cpu")]["img_per_s"] > 0 and "error" not in rows[("train", "cpu")]
    assert rows[("gpu-decode", "nvimgcodec")]["skipped"] == "no CUDA GPU/nvImageCodec"
    assert rows[("train", "gpu")]["skipped"] == "no CUDA GPU/nvImageCodec"
    assert rows[("train", "hybrid")]["skipped"] == "no CUDA GPU/nvImageCodec"


def test_profile_gates_quick_run_lists_every_kernel(tmp_path):
    """`python -m benchmarks.profile_gates --quick` on CPU: one row per gate x shape, each
    with its kernels joined to HLO instructions; CBAM's spatial gate shows its convolutions."""
    from benchmarks import modules, profile_gates

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


def test_profile_step_keeps_every_instruction_with_top_zero(tmp_path):
    """`python -m benchmarks.profile_step --quick --top 0` on CPU: the resnet50 step's every
    instruction, their launches adding up to the step's kernels (the default keeps 25)."""
    from benchmarks import profile_step

    profile_step.main(
        ["--quick", "--models", "resnet50", "--steps", "1", "--top", "0", "--out", str(tmp_path)]
    )
    (row,) = json.loads((tmp_path / "profile_step.json").read_text())["rows"]
    assert "error" not in row, row.get("error")
    assert len(row["top"]) > 25
    assert sum(op["launches"] for op in row["top"]) == row["kernels_per_step"]


def test_scaling_quick_run_records_every_form_and_its_collectives(tmp_path):
    """`scaling` on 2 of the simulated CPU devices: every form is measured against the
    one-device jit row, and the shard_map jit step has fewer collectives than the SPMD one."""
    res = scaling.run(Settings.make(True, tmp_path), counts=(1, 2, 16))
    assert res.meta["not_run"] == [16]
    rows = {(r["impl"], r["n_devices"]): r for r in res.rows}
    assert rows.keys() == {("jit", 1)} | {(impl, 2) for impl in scaling.FORMS}
    assert all("error" not in r and r["img_per_s"] > 0 and r["efficiency"] > 0 for r in res.rows)
    collectives = {impl: rows[(impl, 2)]["collectives"] for impl in scaling.FORMS}
    assert collectives["jit"]["total"] < collectives["jit_spmd"]["total"]
    assert collectives["pmap_local_bn"] == {"all-reduce": 1, "total": 1}
    assert collectives["jit_bn_group"] == {"all-reduce": 1, "total": 1}  # groups of one device
    assert rows[("jit_bn_group", 2)]["bn_group_size"] == 1
    profiles = {p["impl"]: p for p in res.meta["profiles"]}
    assert list(profiles) == list(scaling.PROFILED) and profiles["jit"]["n_devices"] == 2
    assert (
        profiles["jit"]["top_collectives"]
        and "collective" in profiles["jit"]["categories_all_devices"]
    )
    assert json.loads(res.path.read_text())["rows"] == res.rows


def test_multiprocess_quick_run_resumes_after_kill_and_matches_one_process(tmp_path):
    """Two CPU processes (2 devices each) train, are killed after a checkpoint, resume and
    finish with the parameters of one process on 4 devices: each device trains on the same
    rows in both runs, only the cross-process gradient sums round in another order."""
    out = tmp_path / "result.json"
    assert (
        multiprocess.main(["--quick", "--workdir", str(tmp_path / "run"), "--out", str(out)]) == 0
    )
    result = json.loads(out.read_text())
    assert result["pass"] and result["processes"] == 2
    assert 0 < result["resumed_from_step"] < result["steps"] == 24
    assert result["resumed_from_step"] >= result["killed_after_checkpoint"]
    assert result["max_abs_param_diff"] < 1e-5
    assert all(v > 0 for v in result["img_per_s"].values())


@pytest.mark.parametrize("device", ["nvidia-h200", "nvidia-h100-80gb-hbm3"])
def test_policy_spatial_conv_rows_are_the_committed_measurements(device):
    """The spatial-conv rows of `layers.policy.TABLES` for a result's device kind are what
    benchmarks.auto_table derives from its committed modules.json: the H200's rows, and none
    for the H100, whose run timed the library conv alone."""
    from benchmarks import auto_table
    from flax_attention.layers import policy

    result = json.loads((auto_table.RESULTS / device / "modules.json").read_text())
    table = policy.device_table(result["device"])
    committed = {gate: table[gate].rows for gate in auto_table.SPATIAL_GATES if gate in table}
    assert auto_table.fastest_formulations(result["rows"]) == committed
    assert bool(committed) == (device == "nvidia-h200")


def test_auto_spatial_conv_table_reads_the_spatial_conv_rows_of_later_runs():
    """Rows that name their formulation in `spatial_conv` (runs after the gates' `impl` was
    removed) give the same table as the committed rows that named it in `impl` labels."""
    from benchmarks import auto_table

    old = json.loads(auto_table.SOURCE.read_text())["rows"]
    new = []
    for row in old:
        form = auto_table.spatial_conv_of(row)
        if row.get("framework") == "flax" and form is not None:
            new.append({k: v for k, v in row.items() if k != "impl"} | {"spatial_conv": form})
    assert any(row["spatial_conv"] == "auto" for row in new)
    assert auto_table.fastest_formulations(new) == auto_table.fastest_formulations(old)


def test_modules_quick_run_has_a_row_per_spatial_conv(tmp_path):
    """`modules` on CPU: CBAM has a row per formulation and "auto", each with its error
    against the library conv's output; SE one row."""
    from benchmarks import modules

    settings = Settings.make(True, tmp_path)
    res = modules.run(settings, names=("se", "cbam"), frameworks=("flax",))
    assert all("error" not in row for row in res.rows), res.rows
    shape = list(modules.QUICK_SHAPES[0])
    fwdbwd = [r for r in res.rows if r["mode"] == "fwdbwd" and r["shape"] == shape]
    assert [(r["name"], r.get("spatial_conv")) for r in fwdbwd] == [("se", None)] + [
        ("cbam", form) for form in ("conv", "shifts", "im2col", "auto")
    ]
    assert fwdbwd[1]["rel_err_vs_conv"] == 0.0 and fwdbwd[2]["rel_err_vs_conv"] < 0.05
    assert all(r["median_ms"] > 0 for r in res.rows)


@pytest.mark.parametrize(
    ("module", "suite"), [("benchmarks.headline", "train"), ("benchmarks.auto_table", "modules")]
)
def test_table_writers_refuse_a_missing_or_wrong_result_in_one_line(
    module, suite, tmp_path, capsys
):
    import importlib

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


def test_spatial_convs_experiment_swaps_one_stage_of_the_table_at_a_time(monkeypatch):
    """The experiment's cases: the device's table, then each stage with each other
    formulation; the rule it builds the model with picks the swapped entry at every stage,
    and the library's tables are left as they were."""
    from benchmarks.experiments import spatial_convs
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
        ("benchmarks.experiments.spatial_convs", ["--models", "cbam_resnet50,resnet50"]),
        ("benchmarks.experiments.spatial_convs", ["--models", ","]),
        ("benchmarks.profile_step", ["--top", "-1"]),
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
