"""Fine-tuning: `--pretrained SOURCE` starts a training run from saved or PyTorch weights."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from flax import nnx

from flax_attention import checkpoint
from flax_attention.cli.train import main
from flax_attention.convert import to_torch_state_dict
from flax_attention.models import MODELS, BasicBlock, ModelSpec, create_model, registry
from flax_attention.training import ConfigError, TrainConfig, fit
from flax_attention.training import loop as training_loop

TINY = "tiny_se_resnet"  # one SE BasicBlock stage: fast to compile and run on CPU
OTHER = "tiny_cbam_resnet"  # the same, with CBAM: another architecture
HEAD = ("fc",)


@pytest.fixture(autouse=True)
def tiny_models(monkeypatch):
    for name, attention in ((TINY, "se"), (OTHER, "cbam")):
        spec = ModelSpec(name, BasicBlock, (1,), "test", "official", {"attention": attention})
        monkeypatch.setitem(MODELS, name, spec)


def config(data_dir, workdir, **kw) -> TrainConfig:
    values = dict(
        model=TINY,
        dataset="digits",
        data_dir=str(data_dir),
        workdir=str(workdir),
        steps=2,
        batch_size=16,
        parallel="none",
        checkpoint_every=2,
        progress=False,
    )
    return TrainConfig(**{**values, **kw})


def saved_model(folder, *, name=TINY, num_classes=10, in_channels=1, seed=7) -> dict:
    """Save a randomly initialised model to `folder`; its variables, flat."""
    args = {"num_classes": num_classes, "in_channels": in_channels}
    model = create_model(name, rngs=nnx.Rngs(seed), **args)
    checkpoint.save(model, folder, name=name, constructor_args=args, dataset="digits")
    return flat(nnx.state(model))


def flat(state) -> dict:
    return {
        k: np.asarray(v) for k, v in nnx.traversals.flatten_mapping(nnx.to_pure_dict(state)).items()
    }


def starting_variables(cfg: TrainConfig) -> dict:
    """The variables (parameters and BatchNorm statistics) the run of `cfg` starts from."""
    state = training_loop._Run(cfg).state
    return {**flat(state.params), **flat(state.batch_stats)}


def assert_same(got: dict, want: dict, *, skip=()) -> None:
    assert got.keys() == want.keys()
    for key in want:
        if key[: len(HEAD)] != HEAD or HEAD not in skip:
            np.testing.assert_array_equal(got[key], want[key], err_msg=str(key))


def test_starts_from_a_saved_model(data_dir, tmp_path):
    saved = saved_model(tmp_path / "source")
    got = starting_variables(
        config(data_dir, tmp_path / "run", pretrained=str(tmp_path / "source"))
    )
    assert_same(got, saved)
    random = starting_variables(config(data_dir, tmp_path / "plain"))
    assert not np.array_equal(random[("conv1", "kernel")], saved[("conv1", "kernel")])


def test_another_class_count_reinitialises_only_the_head(data_dir, tmp_path):
    saved = saved_model(tmp_path / "source", num_classes=5)
    got = starting_variables(
        config(data_dir, tmp_path / "run", pretrained=str(tmp_path / "source"))
    )
    assert_same(got, saved, skip=(HEAD,))
    random = starting_variables(config(data_dir, tmp_path / "plain"))
    for key in (("fc", "kernel"), ("fc", "bias")):
        assert got[key].shape[-1] == 10
        np.testing.assert_array_equal(got[key], random[key])  # the run's own initialisation


def test_starts_from_a_pytorch_weights_file(data_dir, tmp_path):
    model = create_model(TINY, num_classes=10, in_channels=1, rngs=nnx.Rngs(5))
    path = tmp_path / "weights.npz"
    np.savez(path, **to_torch_state_dict(model, layout="official"))
    got = starting_variables(config(data_dir, tmp_path / "run", pretrained=str(path)))
    assert_same(got, flat(nnx.state(model)))


@pytest.mark.parametrize(
    "source",
    ["absent", "other_arch", "other_channels", "not_weights"],
)
def test_bad_source_is_refused_before_anything_is_written(data_dir, tmp_path, capsys, source):
    path = tmp_path / source
    if source == "other_arch":
        saved_model(path, name=OTHER)
    elif source == "other_channels":
        saved_model(path, in_channels=3)
    elif source == "not_weights":
        path.mkdir()
        (path / "notes.txt").write_text("not a model")
    workdir = tmp_path / "run"
    argv = ["--model", TINY, "--data-dir", str(data_dir), "--workdir", str(workdir)]
    argv += ["--steps", "1", "--batch-size", "16", "--no-progress", "--pretrained", str(path)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert str(path) in err
    assert not workdir.exists()


def test_model_kwargs_cannot_name_weights(data_dir, tmp_path):
    saved_model(tmp_path / "source")
    cfg = config(data_dir, tmp_path / "run", model_kwargs={"pretrained": str(tmp_path / "source")})
    with pytest.raises(ConfigError, match="pretrained"):
        fit(cfg)
    assert not (tmp_path / "run").exists()


def test_a_resumed_fine_tuning_run_continues_from_its_own_checkpoints(
    data_dir, tmp_path, monkeypatch
):
    source = tmp_path / "source"
    saved_model(source)
    first = fit(config(data_dir, tmp_path / "run", pretrained=str(source)))
    assert first["step"] == 2
    shutil.rmtree(source)  # the run's checkpoints are all it needs now

    def refuse(*args, **kwargs):
        raise AssertionError("pretrained weights were read on resume")

    monkeypatch.setattr(checkpoint, "restore", refuse)
    monkeypatch.setattr(registry, "read_weights", refuse)
    resumed = training_loop._Run(
        config(data_dir, tmp_path / "run", steps=3, pretrained=str(source))
    )
    resumed.restore()
    assert int(resumed.state.step) == 2
    final = checkpoint.read_metadata(tmp_path / "run" / "model")
    assert "pretrained" not in final["constructor_args"]
