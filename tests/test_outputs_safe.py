"""Outputs are ours alone: `convert --overwrite`, training's `model/` and `metrics.jsonl` never
take a user's files with them."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flax import nnx

from flax_attention import checkpoint, data
from flax_attention.cli import main as cli_main
from flax_attention.cli.train import main as train_main
from flax_attention.convert import to_torch_state_dict
from flax_attention.models import create_model

TINY = "tiny_se_resnet"  # one SE BasicBlock stage: fast to build, convert and train on CPU


pytestmark = pytest.mark.usefixtures("tiny_model")


@pytest.fixture
def weights(tmp_path):
    """A tiny model's weights as a PyTorch-layout .npz in its own folder."""
    model = create_model(TINY, num_classes=10, rngs=nnx.Rngs(0))
    path = tmp_path / "src" / "tiny.npz"
    path.parent.mkdir()
    np.savez(path, **to_torch_state_dict(model))
    return path


def convert(src, out, *flags: str) -> int:
    return cli_main(["convert", str(src), str(out), "--model", TINY, *flags])


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err.strip()


def listing(folder) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_convert_overwrite_replaces_its_own_checkpoint(weights, tmp_path, capsys):
    out = tmp_path / "out"
    assert convert(weights, out) == 0
    assert convert(weights, out, "--overwrite") == 0
    assert checkpoint.restore(None, out) is not None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]  # no temporary left


def test_convert_overwrite_refuses_a_folder_that_is_not_a_checkpoint(weights, tmp_path, capsys):
    out = tmp_path / "thesis"
    out.mkdir()
    (out / "thesis.txt").write_text("years of work")
    before = listing(tmp_path)
    assert convert(weights, out, "--overwrite") == 2
    message = one_line_error(capsys)
    assert str(out) in message and "not a flax-attention model checkpoint" in message
    assert (out / "thesis.txt").read_text() == "years of work"
    assert listing(tmp_path) == before


def test_convert_overwrite_refuses_a_checkpoint_holding_other_files(weights, tmp_path, capsys):
    out = tmp_path / "out"
    assert convert(weights, out) == 0
    (out / "notes.txt").write_text("mine")
    capsys.readouterr()
    assert convert(weights, out, "--overwrite") == 2
    assert "notes.txt" in one_line_error(capsys)
    assert (out / "notes.txt").read_text() == "mine"


def test_convert_overwrite_never_replaces_the_folder_holding_the_source(weights, tmp_path, capsys):
    out = tmp_path / "out"
    assert convert(weights, out) == 0
    inside = out / "tiny.npz"  # the source kept inside the checkpoint it was converted to
    weights.rename(inside)
    capsys.readouterr()
    assert convert(inside, out, "--overwrite") == 2
    assert str(inside) in one_line_error(capsys)
    assert inside.exists()


@pytest.mark.parametrize("where", [".", ".."])
def test_convert_overwrite_never_replaces_the_current_directory_or_its_ancestors(
    weights, tmp_path, monkeypatch, capsys, where
):
    out = tmp_path / "out"
    assert convert(weights, out) == 0
    monkeypatch.chdir(out / checkpoint.STATE_DIR if where == ".." else out)
    before = listing(tmp_path)
    capsys.readouterr()
    assert convert(weights, where, "--overwrite") == 2
    assert "current directory" in one_line_error(capsys)
    assert listing(tmp_path) == before


@pytest.mark.parametrize("flags", [(), ("--overwrite",)], ids=["plain", "overwrite"])
def test_convert_to_an_existing_file_is_refused_up_front(weights, tmp_path, capsys, flags):
    out = tmp_path / "afile"
    out.write_text("not a folder")
    assert convert(weights, out, *flags) == 2
    assert one_line_error(capsys) == f"error: {out} is a file, not a model checkpoint directory"
    assert out.read_text() == "not a folder"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "src"]


def test_save_overwrite_refuses_a_folder_that_is_not_a_checkpoint(tmp_path):
    model = create_model(TINY, num_classes=10, rngs=nnx.Rngs(0))
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "README.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a flax-attention model checkpoint"):
        checkpoint.save(model, tmp_path / "model", overwrite=True)
    assert listing(tmp_path) == ["model", "model/README.txt"]


# Training: refused at startup, before any data is read.


@pytest.fixture
def no_data_read(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("data was read before the outputs were checked")

    monkeypatch.setattr(data, "data_source", refuse)


def train_argv(workdir, *flags: str) -> list[str]:
    return ["--model", TINY, "--workdir", str(workdir), "--no-progress", *flags]


def test_training_refuses_a_model_folder_that_is_not_ours(tmp_path, capsys, no_data_read):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "README.txt").write_text("mine")
    assert train_main(train_argv(tmp_path)) == 2
    message = one_line_error(capsys)
    assert str(tmp_path / "model") in message
    assert listing(tmp_path) == ["model", "model/README.txt"]


def test_a_fresh_training_run_refuses_existing_metrics(tmp_path, capsys, no_data_read):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 1, "loss": 2.0}\n')
    assert train_main(train_argv(tmp_path)) == 2
    assert str(metrics) in one_line_error(capsys)
    assert metrics.read_text() == '{"step": 1, "loss": 2.0}\n'
    assert listing(tmp_path) == ["metrics.jsonl"]


def test_a_rerun_after_a_run_that_left_no_checkpoint_drops_its_records(tmp_path, capsys):
    """A run killed before its first checkpoint left `checkpoints/` and its records: they are
    the run's own, so the next run starts over and replaces them."""
    digits = tmp_path / "tfds"
    data.build_digits(digits)
    workdir = tmp_path / "run"
    (workdir / "checkpoints").mkdir(parents=True)
    (workdir / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n')
    flags = ["--data-dir", str(digits), "--steps", "2", "--batch-size", "16", "--log-every", "1"]
    assert train_main(train_argv(workdir, *flags, "--parallel", "none")) == 0
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").open()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2]
    assert all(r["loss"] != 9.0 for r in records if "loss" in r)


# The benchmark cache and the lab tools' children.
