"""Resume is exact or refused: the trajectory-determining config is recorded in the workdir and
compared on resume (--steps/--epochs may grow), the data position is inside the checkpoint's
checksum, a num_classes that disagrees with the dataset is refused at start-up, duplicate YAML
keys are refused."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from flax import nnx
from test_training import (
    TINY,
    config,
    flat,
    tiny_abstract_state,
)

from flax_attention import checkpoint
from flax_attention.cli.train import load_config_file, main
from flax_attention.training import ConfigError, TrainCheckpointer, fit

RECORD_NAME = "run_config.json"

pytestmark = pytest.mark.usefixtures("tiny_model")


@pytest.fixture(scope="module")
def finished(data_dir, tmp_path_factory):
    """A finished 4-step run (cosine schedule) with checkpoints at steps 2 and 4."""
    from flax_attention.models import MODELS, BasicBlock, ModelSpec

    workdir = tmp_path_factory.mktemp("finished")
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(
            MODELS, TINY, ModelSpec(TINY, BasicBlock, (1,), "t", "official", {"attention": "se"})
        )
        fit(config(data_dir, workdir, steps=4))
    return workdir


def copy_run(source, target):
    shutil.copytree(source, target, dirs_exist_ok=True)
    return target


def snapshot(directory) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes() if p.is_file() else b"<dir>"
        for p in sorted(directory.rglob("*"))
    }


def test_the_record_names_the_trajectory_config(finished):
    record = json.loads((finished / RECORD_NAME).read_text())
    assert record["batch_size"] == 16 and record["seed"] == 0 and record["steps"] == 4
    assert record["model"] == TINY and record["model_kwargs"] == {}
    assert record["lr"] == 0.05 and record["schedule"] == "cosine"
    for excluded in ("workdir", "log_every", "num_workers", "eval_every", "data_dir"):
        assert excluded not in record
    assert not list(finished.glob(f"*{RECORD_NAME}*.tmp*"))  # written through a renamed temp


@pytest.mark.parametrize(
    "change, expected",
    [
        ({"batch_size": 32}, "batch_size 16 -> 32"),
        ({"seed": 1}, "seed 0 -> 1"),
        ({"lr": 0.1}, "lr 0.05 -> 0.1"),
        ({"steps": 2}, "steps 4 -> 2"),
        ({"model_kwargs": {"attention": "cbam"}}, "model_kwargs {} -> "),
    ],
    ids=["batch_size", "seed", "lr", "fewer-steps", "model_kwargs"],
)
def test_resume_with_another_trajectory_is_refused_before_writing(
    data_dir,
    finished,
    tmp_path,
    change,
    expected,
):
    workdir = copy_run(finished, tmp_path / "run")
    before = snapshot(workdir)
    with pytest.raises(ConfigError) as err:
        fit(config(data_dir, workdir, **{"steps": 4, **change}))
    message = str(err.value)
    assert "\n" not in message and expected in message and str(workdir) in message
    assert snapshot(workdir) == before


def test_resume_with_two_changes_lists_both_keys_on_one_line(
    data_dir,
    finished,
    tmp_path,
    capsys,
):
    workdir = copy_run(finished, tmp_path / "run")
    before = snapshot(workdir)
    argv = ["--model", TINY, "--data-dir", str(data_dir), "--workdir", str(workdir)]
    argv += ["--steps", "4", "--batch-size", "32", "--seed", "3", "--parallel", "none"]
    argv += ["--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "batch_size 16 -> 32" in err and "seed 0 -> 3" in err
    assert snapshot(workdir) == before


def test_settings_that_do_not_change_the_trajectory_may_change(
    data_dir,
    finished,
    tmp_path,
):
    workdir = copy_run(finished, tmp_path / "run")
    result = fit(config(data_dir, workdir, steps=4, log_every=3, keep_checkpoints=2))
    assert result["step"] == 4


def test_growing_a_cosine_run_restretches_the_schedule_and_says_so(
    data_dir,
    finished,
    tmp_path,
    capsys,
):
    workdir = copy_run(finished, tmp_path / "run")
    result = fit(config(data_dir, workdir, steps=6))
    assert result["step"] == 6
    printed = "".join(capsys.readouterr())
    assert "steps grow from 4 to 6" in printed and "cosine" in printed
    assert json.loads((workdir / RECORD_NAME).read_text())["steps"] == 6


def test_growing_a_constant_schedule_run_equals_the_longer_run(
    data_dir,
    tmp_path,
    capsys,
):
    """The constant schedule does not depend on the run's length: a 2-step run grown to 4
    steps ends with the parameters of a 4-step run, and no note is printed."""
    fit(config(data_dir, tmp_path / "grown", steps=2, schedule="constant"))
    fit(config(data_dir, tmp_path / "grown", steps=4, schedule="constant"))
    assert "steps grow" not in "".join(capsys.readouterr())
    fit(config(data_dir, tmp_path / "straight", steps=4, schedule="constant"))
    grown = flat(nnx.state(checkpoint.restore(None, tmp_path / "grown" / "model")))
    straight = flat(nnx.state(checkpoint.restore(None, tmp_path / "straight" / "model")))
    assert grown.keys() == straight.keys()
    for key, value in straight.items():
        np.testing.assert_array_equal(grown[key], value, err_msg=key)


def _meta_file(step_dir):
    (path,) = [
        p
        for p in (step_dir / "meta").rglob("*")
        if p.is_file() and "next_index" in p.read_text(errors="ignore")
    ]
    return path


def test_an_edited_data_position_is_refused_as_corrupt(finished, tmp_path, capsys):
    checkpoints = copy_run(finished / "checkpoints", tmp_path / "checkpoints")
    meta = _meta_file(checkpoints / "4")
    text = meta.read_text()
    assert '"next_index": 4' in text
    meta.write_text(text.replace('"next_index": 4', '"next_index": 40'))
    manager = TrainCheckpointer(checkpoints)
    try:
        _, data_state, step = manager.restore_latest(tiny_abstract_state())
    finally:
        manager.close()
    assert step == 2 and data_state == {"next_index": 2}
    assert f"refusing checkpoint {checkpoints / '4'}" in capsys.readouterr().err


@pytest.mark.parametrize(
    "name, wrong, right, expected",
    [
        ("num_classes", 5, 10, r"num_classes 5 .*digits.* 10 classes"),
        ("in_channels", 3, 1, r"in_channels 3 .*digits.* 1 channels"),
    ],
)
def test_a_model_that_does_not_fit_the_dataset_is_refused(
    data_dir,
    tmp_path,
    name,
    wrong,
    right,
    expected,
):
    with pytest.raises(ConfigError, match=expected):
        config(data_dir, tmp_path, model_kwargs={name: wrong})
    assert list(tmp_path.iterdir()) == []
    config(data_dir, tmp_path, model_kwargs={name: right})  # agreeing: accepted


def test_num_classes_disagreeing_is_one_line_from_the_program(tmp_path, capsys):
    path = tmp_path / "five.yaml"
    path.write_text(
        f"dataset: digits\nworkdir: {tmp_path / 'w'}\nmodel_kwargs: {{num_classes: 5}}\n"
    )
    assert main(["--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "num_classes 5" in err
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize(
    "text, key",
    [
        ("lr: 0.1\nbatch_size: 8\nlr: 0.2\n", "lr"),
        ("model_kwargs:\n  num_classes: 10\n  num_classes: 5\n", "num_classes"),
    ],
    ids=["top-level", "nested"],
)
def test_duplicate_yaml_keys_are_refused(tmp_path, text, key):
    path = tmp_path / "dup.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config_file(str(path))
    message = str(err.value)
    assert "\n" not in message and str(path) in message and f"duplicate key '{key}'" in message


def test_yaml_merge_keys_still_override(tmp_path):
    path = tmp_path / "merge.yaml"
    path.write_text("model_kwargs:\n  <<: {impl: xla, foo: 1}\n  impl: auto\n")
    assert load_config_file(str(path))["model_kwargs"] == {"impl": "auto", "foo": 1}
