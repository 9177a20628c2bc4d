"""The suites users run: the warm phase's shards and bookkeeping, its cache and workers, one
end-to-end `python -m benchmarks --quick` run on CPU (a worker process compiles, the timed
process loads), and each suite's quick run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import __main__ as bench_main
from benchmarks import modules, scaling, warm
from benchmarks.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


def listing(folder) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


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


def test_scaling_quick_run_records_every_form_and_its_collectives(tmp_path):
    """`scaling` on 2 of the simulated CPU devices: every training form is measured against
    the one-device jit row, with its collectives; BatchNorm groups of one device leave the
    gradients' all-reduce alone."""
    res = scaling.run(Settings.make(True, tmp_path), counts=(1, 2, 16))
    assert res.meta["not_run"] == [16]
    rows = {(r["impl"], r["n_devices"]): r for r in res.rows}
    assert rows.keys() == {("jit", 1)} | {(impl, 2) for impl in scaling.VARIANTS}
    assert all("error" not in r and r["img_per_s"] > 0 and r["efficiency"] > 0 for r in res.rows)
    collectives = {impl: rows[(impl, 2)]["collectives"] for impl in scaling.VARIANTS}
    assert collectives["jit"]["all-gather"] > 0 and collectives["pmap"]["total"] > 1
    assert collectives["jit_bn_group"] == {"all-reduce": 1, "total": 1}  # groups of one device
    assert rows[("jit_bn_group", 2)]["bn_group_size"] == 1
    assert json.loads(res.path.read_text())["rows"] == res.rows


def test_modules_quick_run_has_a_row_per_spatial_conv(tmp_path, monkeypatch):
    """`modules` on CPU, on the first quick shape (the formulations on odd sizes are the
    library tests'): CBAM has a row per formulation and "auto", each with its error against
    the library conv's output; SE one row."""
    monkeypatch.setattr(modules, "QUICK_SHAPES", modules.QUICK_SHAPES[:1])
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


@pytest.mark.parametrize("keep", [False, True], ids=["fresh", "keep-cache"])
def test_benchmark_cache_deletes_only_its_own_subfolders(tmp_path, monkeypatch, keep):
    cache = tmp_path / "cache"
    for part in ("jax", "warm", "inductor"):
        (cache / part).mkdir(parents=True)
        (cache / part / "entry").write_text("cached")
    (cache / "notes.txt").write_text("mine")
    monkeypatch.setattr(bench_main, "enable_caches", lambda path: None)  # JAX config: global
    argv = ["--suites", "", "--no-warm", "--cache", str(cache), "--out", str(tmp_path / "out")]
    bench_main.main(argv + ["--keep-cache"] * keep)
    assert (cache / "notes.txt").read_text() == "mine"
    kept = ["jax", "jax/entry", "inductor", "inductor/entry", "warm", "warm/entry"] * keep
    assert listing(cache) == sorted(["notes.txt", *kept])


def sleeper(popen, interrupt_at: int | None = None):
    """A `subprocess.Popen` that starts a child sleeping a minute instead of `cmd` (Ctrl-C
    instead at start number `interrupt_at`), and the list of (child or None, its stdout)."""
    started = []

    def start(cmd, **kwargs):
        if len(started) + 1 == interrupt_at:
            started.append((None, kwargs["stdout"]))
            raise KeyboardInterrupt
        proc = popen([sys.executable, "-c", "import time; time.sleep(60)"], **kwargs)
        started.append((proc, kwargs["stdout"]))
        return proc

    return start, started


def test_warm_run_stops_its_workers_and_closes_their_logs_on_ctrl_c(tmp_path, monkeypatch):
    start, started = sleeper(subprocess.Popen, interrupt_at=2)
    monkeypatch.setattr(warm.subprocess, "Popen", start)
    shards = [warm.Shard(f"train m{i} flax", (), 1.0, None) for i in range(2)]
    with pytest.raises(KeyboardInterrupt):
        warm.run(shards, tmp_path / "cache", tmp_path / "warm", 2, 8.0)
    (first, first_log), (_, second_log) = started
    assert first.poll() is not None and first_log.closed and second_log.closed
