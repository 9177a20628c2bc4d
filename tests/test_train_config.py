"""The training configuration: flags from TrainConfig's fields, every bad value or config file
refused in one line (exit status 2) before any data or model is touched, the flag table of
docs/training.md generated from the dataclass, intervals in epochs, and the packaging of the
program."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

from flax_attention import data
from flax_attention.cli.train import (
    CONFIG_DIR,
    build_parser,
    flags_markdown,
    load_config_file,
    main,
    parse_config,
)
from flax_attention.models import MODELS, BasicBlock, ModelSpec
from flax_attention.training import TrainConfig, fit
from flax_attention.training import loop as training_loop
from flax_attention.training.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def nothing_is_touched(monkeypatch):
    """Any read of a dataset or build of a model fails the test: validation comes first."""

    def touched(*args, **kwargs):
        raise AssertionError("data or a model was touched before the config was validated")

    monkeypatch.setattr(data, "data_source", touched)
    monkeypatch.setattr(data, "get_spec", touched)
    monkeypatch.setattr(training_loop, "build_model", touched)


def run_cli(argv: list[str], workdir: Path, capsys) -> tuple[int, str]:
    """(exit status, stderr) of the program with `argv`, with `workdir` as --workdir."""
    try:
        status = main([*argv, "--workdir", str(workdir)] if workdir else argv)
    except SystemExit as exit_:
        status = exit_.code
    return status, capsys.readouterr().err


def assert_usage_error(status: int, err: str, *needles: str) -> None:
    assert status == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, err)


BAD_FLAGS = [
    (["--steps", "0"], "steps must be >= 1"),
    (["--steps", "-5"], "steps must be >= 1"),
    (["--epochs", "0"], "epochs must be a finite number > 0"),
    (["--batch-size", "0"], "batch_size must be >= 1"),
    (["--eval-batch-size", "0"], "eval_batch_size must be >= 1"),
    (["--image-size", "0"], "image_size must be >= 1"),
    (["--lr", "-1"], "lr must be a finite number > 0"),
    (["--lr", "0"], "lr must be a finite number > 0"),
    (["--lr", "nan"], "lr must be a finite number > 0"),
    (["--lr", "inf"], "lr must be a finite number > 0"),
    (["--lr", "fast"], "--lr"),
    (["--label-smoothing", "2"], "label_smoothing must be in [0, 1)"),
    (["--label-smoothing", "-0.1"], "label_smoothing must be in [0, 1)"),
    (["--warmup-steps", "-3"], "warmup_steps must be >= 0"),
    (["--weight-decay=-1e-4"], "weight_decay must be >= 0"),
    (["--momentum", "1"], "momentum must be in [0, 1)"),
    (["--num-workers", "-1"], "num_workers must be >= 0"),
    (["--keep-checkpoints", "0"], "keep_checkpoints must be >= 1"),
    (["--checkpoint-every", "0"], "checkpoint_every must be >= 1"),
    (["--checkpoint-every", "0ep"], "checkpoint_every must be more than 0 epochs"),
    (["--log-every", "0"], "log_every must be >= 1"),
    (["--eval-every", "-1"], "eval_every must be >= 0"),
    (["--eval-every", "2x"], "eval_every must be a number of steps"),
    (["--seed", "-1"], "seed must be >= 0"),
    (["--optimizer", "adam"], "--optimizer"),
    (["--schedule", "step"], "--schedule"),
    (["--model", "resnet9"], "--model"),
    (["--dataset", "mnist"], "--dataset"),
    (["--parallel", "pjit"], "--parallel"),
    (["--precision", "fp16"], "--precision"),
    (["--decoder", "tpu"], "--decoder"),
    (["--config", "nonexistent"], "no config file 'nonexistent'"),
]


@pytest.mark.parametrize(("argv", "message"), BAD_FLAGS, ids=[" ".join(a) for a, _ in BAD_FLAGS])
def test_bad_flag_is_one_line_exit_2_and_writes_nothing(argv, message, tmp_path, capsys):
    workdir = tmp_path / "run"
    status, err = run_cli(argv, workdir, capsys)
    assert_usage_error(status, err, message)
    assert "Traceback" not in err
    assert not workdir.exists()


BAD_FILES = [
    ("lr: fast\n", "lr must be a number, got 'fast'"),
    ("lr: [1, 2]\n", "lr must be a number, got [1, 2]"),
    ("steps: 1.5\n", "steps must be an integer, got 1.5"),
    ("steps: 0\n", "steps must be >= 1"),
    ("nesterov: maybe\n", "nesterov must be true or false"),
    ("model: 18\n", "model must be a string"),
    ("model: resnet9\n", "model: unknown value 'resnet9'"),
    ("optimizer: adam\n", "optimizer: unknown value 'adam'"),
    ("model_kwargs: [1]\n", "model_kwargs must be a mapping"),
    ("workdir: null\n", "workdir must not be empty"),
    ("bogus: 1\nlr: 0.1\n", "unknown config keys ['bogus']"),
    ("- lr: 0.1\n", "expected a mapping of config keys, got list"),
    ("just text\n", "expected a mapping of config keys, got str"),
    ("lr: [0.1\n", "invalid YAML at line 2"),
    ("lr: 0.1\n\tsteps: 3\n", "invalid YAML at line 2"),
]


@pytest.mark.parametrize(("text", "message"), BAD_FILES, ids=[t for t, _ in BAD_FILES])
def test_bad_config_file_is_one_line_naming_the_file(text, message, tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    workdir = tmp_path / "run"
    status, err = run_cli(["--config", str(path)], workdir, capsys)
    assert_usage_error(status, err, message, str(path))
    assert not workdir.exists()


def test_workdir_that_cannot_be_created(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    status, err = run_cli([], blocker / "run", capsys)
    assert_usage_error(status, err, "workdir", "is under a file", str(blocker))
    status, err = run_cli([], blocker, capsys)
    assert_usage_error(status, err, "workdir", "is a file")
    status, err = run_cli(["--workdir", ""], None, capsys)
    assert_usage_error(status, err, "workdir must not be empty")


def test_python_api_is_validated_too(tmp_path):
    with pytest.raises(ConfigError, match="steps must be >= 1"):
        TrainConfig(steps=0, workdir=str(tmp_path))
    with pytest.raises(ConfigError, match="lr must be a number, got 'fast'"):
        TrainConfig(lr="fast", workdir=str(tmp_path))
    with pytest.raises(ConfigError, match=r"unknown config keys \['bogus'\]"):
        TrainConfig.from_dict({"bogus": 1})
    config = TrainConfig(workdir=str(tmp_path / "run"))
    config.keep_checkpoints = 0  # fields changed after construction are checked by fit
    with pytest.raises(ConfigError, match="keep_checkpoints must be >= 1"):
        fit(config)
    assert not (tmp_path / "run").exists()


def test_numbers_are_widened_and_yaml_exponents_read_as_floats(tmp_path):
    path = tmp_path / "ok.yaml"
    path.write_text("lr: 1e-3\nepochs: 2\nweight_decay: 5.0e-5\neval_every: 2ep\n")
    values = load_config_file(str(path))
    assert values == {"lr": 0.001, "epochs": 2.0, "weight_decay": 5e-5, "eval_every": "2ep"}
    assert isinstance(values["epochs"], float)


def test_intervals_in_epochs(tmp_path):
    config = parse_config(
        ["--workdir", str(tmp_path), "--eval-every", "2ep", "--checkpoint-every", "0.5ep"]
    )
    assert (config.eval_every, config.checkpoint_every) == ("2ep", "0.5ep")
    assert config.log_every == 5  # from the shipped default.yaml
    resolved = config.in_steps(steps_per_epoch=22)
    assert (resolved.eval_every, resolved.checkpoint_every, resolved.log_every) == (44, 11, 5)
    assert resolved.steps == 220  # 10 epochs (default.yaml) of 22 steps
    assert dataclasses.replace(config, steps=7).in_steps(22).steps == 7
    assert TrainConfig(workdir=str(tmp_path), log_every="0.01ep").in_steps(22).log_every == 1


def test_precedence_defaults_then_config_file_then_flags(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("lr: 0.5\nsteps: 9\n")
    config = parse_config(["--config", str(path), "--steps", "3", "--workdir", str(tmp_path)])
    assert (config.lr, config.steps, config.epochs) == (0.5, 3, TrainConfig.epochs)


def test_flags_are_built_from_the_fields_and_choices_from_the_registries(tmp_path, monkeypatch):
    parser = build_parser({f.name: None for f in dataclasses.fields(TrainConfig)})
    flags = {option for action in parser._actions for option in action.option_strings}
    for field in dataclasses.fields(TrainConfig):
        if field.name != "model_kwargs":
            assert "--" + field.name.replace("_", "-") in flags, field.name
        assert field.metadata.get("help"), f"{field.name} has no help text"
    spec = ModelSpec("new_model", BasicBlock, (1,), "test", "official", {})
    monkeypatch.setitem(MODELS, "new_model", spec)
    config = parse_config(["--model", "new_model", "--workdir", str(tmp_path)])
    assert config.model == "new_model"


def test_shipped_configs_are_valid(tmp_path):
    names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    assert names == ["cifar10", "default", "imagenet_resnet50", "imagenet_tpu_pod"]
    for name in names:
        values = load_config_file(name)
        TrainConfig.from_dict({**values, "workdir": str(tmp_path)})


def test_docs_flag_table_is_generated_from_the_dataclass():
    page = (ROOT / "docs" / "training.md").read_text()
    table = flags_markdown()
    assert table in page, (
        "docs/training.md's flag table differs from TrainConfig; paste the output of\n"
        "python -c 'from flax_attention.cli.train import flags_markdown as f; print(f())'"
    )
    names = []
    for row in table.splitlines()[2:]:
        first = row.split("|")[1].split("`")[1].split()[0]  # --steps, --[no-]resume, model_kwargs:
        names.append(first.removeprefix("--").removeprefix("[no-]").rstrip(":").replace("-", "_"))
    assert sorted(names) == sorted(["config", *(f.name for f in dataclasses.fields(TrainConfig))])


def test_one_program_and_no_top_level_train_package_is_installed():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    include = project["tool"]["setuptools"]["packages"]["find"]["include"]
    assert all(not pattern.startswith("train") for pattern in include), include
    assert project["project"]["scripts"] == {"flax-attention": "flax_attention.cli:main"}
    assert any(dep.lower().startswith("pyyaml") for dep in project["project"]["dependencies"])
    shipped = project["tool"]["setuptools"]["package-data"]["flax_attention.training"]
    assert shipped == ["configs/*.yaml"]


def test_the_configs_are_files_of_the_package(tmp_path):
    """The configs are regular files under the package (no link out of it), so a wheel built
    from the package alone ships them, and its only program is `flax-attention`."""
    assert CONFIG_DIR == ROOT / "flax_attention" / "training" / "configs"
    assert not CONFIG_DIR.is_symlink()
    assert all(path.is_file() and not path.is_symlink() for path in CONFIG_DIR.iterdir())
    source = tmp_path / "source"
    skip = shutil.ignore_patterns("__pycache__")
    shutil.copytree(ROOT / "flax_attention", source / "flax_attention", symlinks=True, ignore=skip)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    build = "from setuptools import build_meta; print(build_meta.build_wheel(%r))"
    done = subprocess.run(
        [sys.executable, "-c", build % str(tmp_path / "dist")],
        cwd=source,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    with zipfile.ZipFile(tmp_path / "dist" / done.stdout.split()[-1]) as wheel:
        names = wheel.namelist()
        entry_points = next(name for name in names if name.endswith("entry_points.txt"))
        scripts = wheel.read(entry_points).decode().split()
    configs = sorted(n for n in names if n.startswith("flax_attention/training/configs/"))
    assert configs == [
        f"flax_attention/training/configs/{p.name}" for p in sorted(CONFIG_DIR.iterdir())
    ]
    assert scripts == ["[console_scripts]", "flax-attention", "=", "flax_attention.cli:main"]


def test_python_m_train_from_the_repository_root():
    result = subprocess.run(
        [sys.executable, "-m", "train", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "--eval-every" in result.stdout and "(default: 44)" in result.stdout  # default.yaml
    result = subprocess.run(
        [sys.executable, "-m", "train", "--steps", "0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and result.stderr == "error: steps must be >= 1 (got 0)\n"
