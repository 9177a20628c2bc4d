"""Every failure one line with the right exit status, every bug a traceback (both programs);
what a failed save or a damaged checkpoint leaves behind, and how much it prints."""

from __future__ import annotations

import dataclasses
import errno
import gc
import shutil
import sys
import tempfile
import threading
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from flax_attention import cli, data, training
from flax_attention.cli.train import main
from flax_attention.models import MODELS, BasicBlock, ModelSpec
from flax_attention.training import TrainConfig, fit, loop
from flax_attention.training.evaluate import evaluate

TINY = "tiny_se_resnet"


pytestmark = pytest.mark.usefixtures("tiny_model")


def argv(data_dir, workdir, *more: str) -> list[str]:
    return [
        *("--model", TINY, "--data-dir", str(data_dir), "--workdir", str(workdir)),
        *("--steps", "4", "--batch-size", "16", "--checkpoint-every", "2", "--parallel", "none"),
        *("--no-progress", *more),
    ]


def config(data_dir, workdir, **kw) -> TrainConfig:
    values = dict(
        model=TINY,
        dataset="digits",
        data_dir=str(data_dir),
        workdir=str(workdir),
        steps=4,
        batch_size=16,
        checkpoint_every=2,
        parallel="none",
        progress=False,
    )
    return TrainConfig(**{**values, **kw})


@pytest.fixture(scope="module")
def finished(data_dir, tmp_path_factory):
    """The workdir of a finished 4-step run with checkpoints of steps 2 and 4."""
    workdir = tmp_path_factory.mktemp("finished")
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(
            MODELS, TINY, ModelSpec(TINY, BasicBlock, (1,), "t", "official", {"attention": "se"})
        )
        fit(config(data_dir, workdir))
    return workdir


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


# The training program: bugs are not usage errors.


def test_a_bug_in_the_run_prints_its_traceback_and_exits_1(tmp_path, monkeypatch, capsys):
    def shape_bug(config):
        np.zeros((3,)) + np.zeros((4,))

    monkeypatch.setattr(training, "fit", shape_bug)
    assert main(["--workdir", str(tmp_path / "w"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "in shape_bug" in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: internal error (ValueError: operands could not be broadcast")
    assert "this is a bug" in last


# The training program: user errors are one line, exit 2.


def test_a_config_file_that_is_not_utf8_is_one_line(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_bytes(b"model: se_resnet18\nworkdir: caf\xe9\n")
    assert main(["--config", str(path)]) == 2
    line = one_error_line(capsys)
    assert str(path) in line and "not UTF-8" in line


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        ("{foo: 1}", "model_kwargs: unknown keys ['foo']; known keys: ['attention'"),
        ("{attention: fastest}", "model_kwargs {'attention': 'fastest'}: "),
    ],
    ids=["unknown", "bad-value"],
)
def test_a_bad_model_kwarg_is_one_line_naming_it(data_dir, tmp_path, capsys, kwargs, expected):
    path = tmp_path / "kw.yaml"
    path.write_text(f"model_kwargs: {kwargs}\n")
    assert main(["--config", str(path), *argv(data_dir, tmp_path / "w")]) == 2
    assert expected in one_error_line(capsys)


def test_a_corrupt_data_file_is_one_line_naming_it(data_dir, tmp_path, capsys):
    damaged = tmp_path / "tfds"
    shutil.copytree(data_dir, damaged)
    (train_file,) = damaged.rglob("*-train.array_record-*")
    train_file.write_bytes(b"garbage" * 100)
    assert main(argv(damaged, tmp_path / "w")) == 2
    line = one_error_line(capsys)
    assert "'train' data files of 'digits'" in line and str(damaged) in line
    assert "prepare the dataset again" in line


def test_a_read_only_data_dir_is_one_line_naming_it(tmp_path, monkeypatch, capsys):
    """Preparing the embedded dataset in a read-only data dir (what tfds raises there)."""
    read_only = tmp_path / "ro"

    def build(path):
        raise OSError(errno.EROFS, "Read-only file system", str(read_only / "downloads"))

    spec = dataclasses.replace(data.DATASETS["digits"], build=build)
    monkeypatch.setitem(data.DATASETS, "digits", spec)
    assert main(argv(read_only, tmp_path / "w")) == 2
    line = one_error_line(capsys)
    assert f"cannot use {read_only / 'downloads'}: Read-only file system" in line


def test_a_read_only_checkpoint_directory_stops_before_training(
    data_dir, tmp_path, monkeypatch, capsys
):
    """The write test at start (before, the first save waited 5 minutes at a barrier)."""
    checkpoints = tmp_path / "w" / "checkpoints"
    make_temp = tempfile.TemporaryFile

    def read_only(*args, dir=None, **kwargs):
        if dir is not None and str(dir) == str(checkpoints):
            raise OSError(errno.EROFS, "Read-only file system", str(dir))
        return make_temp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "TemporaryFile", read_only)
    monkeypatch.setattr(data, "make_loader", pytest.fail)  # no training step
    assert main(argv(data_dir, tmp_path / "w")) == 2
    line = one_error_line(capsys)
    assert f"cannot use {checkpoints}: Read-only file system" in line


DISK_FULL = {
    "OSError": lambda tmp: OSError(errno.ENOSPC, "No space left on device", tmp),
    "tensorstore": lambda tmp: ValueError(
        f'RESOURCE_EXHAUSTED: Error writing "params.fc.bias.value/0" in OCDBT database at local '
        f'file "{tmp}/state/": Failed writing: "{tmp}/state/d/a6d1": Failed to write 8 bytes to '
        "file 5: No space left on device [os_error_code='28']"
    ),
}


@pytest.mark.parametrize("error", DISK_FULL.values(), ids=DISK_FULL.keys())
def test_a_full_disk_is_one_line_exit_1(data_dir, tmp_path, monkeypatch, capsys, error):
    def disk_full(self, step, *args, **kwargs):
        raise error(f"{self.directory}/{step}.orbax-checkpoint-tmp")

    monkeypatch.setattr(ocp.CheckpointManager, "save", disk_full)
    assert main(argv(data_dir, tmp_path)) == 1
    line = one_error_line(capsys)
    assert "No space left on device" in line and str(tmp_path / "checkpoints") in line
    assert "free some space" in line


def test_a_save_left_unfinished_does_not_block_the_next_run(data_dir, tmp_path, finished, capsys):
    """A save cut off (disk full, kill) leaves orbax's temporary directory: removed at start."""
    shutil.copytree(finished / "checkpoints", tmp_path / "checkpoints")
    shutil.copy(finished / "metrics.jsonl", tmp_path / "metrics.jsonl")
    unfinished = tmp_path / "checkpoints" / "6.orbax-checkpoint-tmp-1764000000"
    (unfinished / "state").mkdir(parents=True)
    (unfinished / "state" / "d").write_bytes(b"half")
    assert main(argv(data_dir, tmp_path, "--steps", "6")) == 0
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert "6" in names and not [name for name in names if "orbax-checkpoint-tmp" in name]


def test_a_corrupt_metrics_log_is_one_line_and_trains_nothing(data_dir, tmp_path, finished, capsys):
    """Resuming over a metrics.jsonl with a line that is not a record (edited by hand, another
    program's file): one line naming the file and the line, exit 2, no step trained."""
    shutil.copytree(finished / "checkpoints", tmp_path / "checkpoints")
    lines = (finished / "metrics.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "metrics.jsonl").write_text(lines[0] + "not json\n" + "".join(lines[1:]))
    assert main(argv(data_dir, tmp_path, "--steps", "6")) == 2
    line = one_error_line(capsys)
    assert "metrics.jsonl, line 2: not a JSON record" in line and "move it away" in line
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["2", "4"]


def test_recovery_from_a_lost_data_file_prints_one_line(
    data_dir, tmp_path, finished, capfd, monkeypatch
):
    """A data file of the newest checkpoint deleted: one line says which step was set aside
    and why (before: also dozens of "Event loop is closed" tracebacks, tensorstore finishing
    the reads orbax abandoned, reported through `sys.unraisablehook`)."""
    reported = []
    monkeypatch.setattr(sys, "unraisablehook", lambda report: reported.append(report.exc_value))
    shutil.copytree(finished / "checkpoints", tmp_path / "checkpoints")
    step_files = [p for p in (tmp_path / "checkpoints" / "4" / "state").rglob("*") if p.is_file()]
    (lost,) = [p for p in step_files if p.parent.name == "d" and p.parent.parent.name == "state"]
    lost.unlink()
    capfd.readouterr()
    fit(config(data_dir, tmp_path))
    gc.collect()
    time.sleep(0.5)  # reads finishing late
    err = capfd.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err[-3000:]
    assert lines[0].startswith(f"warning: refusing checkpoint {tmp_path / 'checkpoints' / '4'}")
    assert f"moved the refused checkpoint aside to {tmp_path / 'checkpoints' / '4.corrupt'}" in err
    assert reported == []


# The `flax-attention` program.


def test_flax_attention_bug_prints_its_traceback(monkeypatch, capsys):
    def shape_bug(args):
        np.zeros((3,)).reshape(4)

    monkeypatch.setattr(cli, "cmd_list", shape_bug)
    assert cli.main(["list"]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "in shape_bug" in err
    assert err.strip().splitlines()[-1].startswith("error: internal error (ValueError: ")


# Evaluation and start-up.


def test_an_empty_evaluation_shard_is_padded(data_dir, monkeypatch):
    """Process 1 of 2 over a 1-image split has no rows: it still runs the step, all masked."""
    make_dataset = data.make_dataset
    monkeypatch.setattr(
        data, "make_dataset", lambda *a, **k: make_dataset(*a, **k, shard_index=1, shard_count=2)
    )
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    seen = []

    def eval_fn(state, batch):
        seen.append({k: (v.shape, v.dtype) for k, v in batch.items()})
        return {"count": batch["mask"].sum(), "loss": 0.0, "top1": 0.0, "top5": 0.0}

    result = evaluate(
        eval_fn, None, "digits", local_batch=4, data_dir=data_dir, split="test[:1]", progress=False
    )
    assert result == {"eval_loss": 0.0, "eval_top1": 0.0, "eval_top5": 0.0}
    assert seen == [
        {
            "image": ((4, 16, 16, 1), np.dtype(np.uint8)),
            "label": ((4,), np.dtype(np.int32)),
            "mask": ((4,), np.dtype(np.float32)),
        }
    ]


def test_distributed_is_initialised_once_per_process(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: bool(calls))
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: calls.append(1))

    class Run:
        def __init__(self, cfg):
            pass

        def train(self):
            return {}

    monkeypatch.setattr(loop, "_Run", Run)
    for _ in range(2):
        loop.fit(TrainConfig(workdir=str(tmp_path), distributed=True))
    assert calls == [1]


def test_closing_the_prefetch_with_a_blocked_loader_returns_and_says_so(monkeypatch, capsys):
    from flax_attention.data import device

    release = threading.Event()

    def loader():
        yield {"x": 1}, 1
        release.wait()  # a loader stuck waiting for a worker
        yield {"x": 2}, 2

    monkeypatch.setattr(device, "STOP_TIMEOUT_S", 0.2)
    batches = device.prefetch_to_device(loader(), lambda batch: batch)
    assert next(batches) == ({"x": 1}, 1)
    closer = threading.Thread(target=batches.close, daemon=True)
    closer.start()
    closer.join(timeout=5)
    stuck = closer.is_alive()
    release.set()
    assert not stuck, "closing waited for the blocked loader"
    assert "the input thread did not stop within 0.2 s" in capsys.readouterr().err
