"""Orbax save/restore of models: bit-identical round trips, metadata, clear errors."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flax_attention import checkpoint
from flax_attention.models import BasicBlock, ResNet, create_model

NAME, ARGS = "bam_resnet18", {"num_classes": 5}


def random_model(seed: int) -> nnx.Module:
    """bam_resnet18 with random parameters and BatchNorm statistics, in eval mode."""
    model = nnx.eval_shape(lambda: create_model(NAME, rngs=nnx.Rngs(0), **ARGS))
    rng = np.random.default_rng(seed)
    state = nnx.state(model)
    values = jax.tree.map(lambda a: rng.uniform(0.5, 1.5, a.shape).astype(a.dtype), state)
    nnx.update(model, values)
    model.eval()
    return model


def logits(model: nnx.Module, x: jax.Array) -> np.ndarray:
    graphdef, state = nnx.split(model)
    return np.asarray(jax.jit(lambda s, v: nnx.merge(graphdef, s)(v))(state, x))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = random_model(0)
    source = tmp_path_factory.mktemp("src") / "weights.pth"
    source.write_bytes(b"weights")
    directory = tmp_path_factory.mktemp("ckpt") / "model"
    checkpoint.save(
        model, directory, name=NAME, constructor_args=ARGS, layout="official", source_file=source
    )
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 32, 32, 3), np.float32))
    return model, directory, source, x


def test_restore_by_name_from_metadata_is_bit_identical(saved):
    model, directory, source, x = saved
    restored = checkpoint.restore(None, directory)
    restored.eval()
    np.testing.assert_array_equal(logits(restored, x), logits(model, x))
    meta = json.loads((directory / checkpoint.METADATA_FILE).read_text())
    assert meta["model"] == NAME and meta["constructor_args"] == ARGS
    assert meta["layout"] == "official"
    assert meta["source_file"]["sha256"] == checkpoint.sha256_of(source)
    assert checkpoint.restore(NAME, directory).fc.kernel.get_value().shape == (512, 5)


def test_restore_into_a_given_model_is_bit_identical(saved):
    model, directory, _, x = saved
    target = random_model(1)
    assert checkpoint.restore(target, directory) is target
    np.testing.assert_array_equal(logits(target, x), logits(model, x))
    np.testing.assert_array_equal(
        np.asarray(target.bn1.var.get_value()), np.asarray(model.bn1.var.get_value())
    )


def test_errors_are_clear(saved, tmp_path):
    model, directory, _, _ = saved
    with pytest.raises(FileNotFoundError, match="no checkpoint directory"):
        checkpoint.restore(None, tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="not a flax_attention checkpoint"):
        checkpoint.restore(None, tmp_path)
    with pytest.raises(ValueError, match="holds model 'bam_resnet18', not 'resnet18'"):
        checkpoint.restore("resnet18", directory)
    other = nnx.eval_shape(
        lambda: ResNet(BasicBlock, (2, 2, 2, 2), num_classes=7, rngs=nnx.Rngs(0))
    )
    with pytest.raises(ValueError) as info:
        checkpoint.restore(other, directory)
    assert "shape mismatch: fc.kernel: model (512, 7), checkpoint (512, 5)" in str(info.value)
    assert "not in model: stage_attention.0." in str(info.value)
    with pytest.raises(FileExistsError):
        checkpoint.save(model, directory)


def test_save_leaves_no_temporary_directory(saved, tmp_path):
    model, directory, _, _ = saved
    assert [p.name for p in directory.parent.iterdir()] == [directory.name]
    checkpoint.save(model, directory, name=NAME, constructor_args=ARGS, overwrite=True)
    assert [p.name for p in directory.parent.iterdir()] == [directory.name]
