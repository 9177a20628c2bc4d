"""Orbax save/restore of models: bit-identical round trips, eval mode, checksums, metadata
errors."""

from __future__ import annotations

import json
import re
import shutil

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


def batchnorm_modes(model: nnx.Module) -> set[bool]:
    """`use_running_average` of every BatchNorm: {True} in eval mode, {False} in training."""
    return {m.use_running_average for _, m in nnx.iter_graph(model) if isinstance(m, nnx.BatchNorm)}


def nnx_path(model: nnx.Module, dotted: str) -> jax.Array:
    node = model
    for part in dotted.split("."):
        node = node[int(part)] if part.isdigit() else getattr(node, part)
    return node.get_value()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = random_model(0)
    source = tmp_path_factory.mktemp("src") / "weights.pth"
    source.write_bytes(b"weights")
    directory = tmp_path_factory.mktemp("ckpt") / "model"
    checkpoint.save(
        model,
        directory,
        name=NAME,
        constructor_args=ARGS,
        layout="official",
        source_file=source,
        dataset="cifar10",
        image_size=32,
    )
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 32, 32, 3), np.float32))
    return model, directory, source, x


def test_restore_by_name_from_metadata_is_bit_identical(saved):
    model, directory, source, x = saved
    restored = checkpoint.restore(None, directory)  # in eval mode: no .eval() needed
    assert batchnorm_modes(restored) == {True}
    np.testing.assert_array_equal(logits(restored, x), logits(model, x))
    meta = json.loads((directory / checkpoint.METADATA_FILE).read_text())
    assert meta["model"] == NAME and meta["constructor_args"] == ARGS
    assert meta["layout"] == "official"
    assert meta["dataset"] == "cifar10" and meta["image_size"] == 32
    assert meta["arrays"]["bn1.var"] == checkpoint.array_record(model.bn1.var.get_value())
    assert meta["source_file"]["sha256"] == checkpoint.sha256_of(source)
    assert checkpoint.restore(NAME, directory).fc.kernel.get_value().shape == (512, 5)


def test_restore_into_a_given_model_is_bit_identical(saved):
    model, directory, _, x = saved
    target = random_model(1)
    target.train()
    assert checkpoint.restore(target, directory) is target
    assert batchnorm_modes(target) == {True}
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


def test_restore_in_training_mode_when_asked(saved):
    _, directory, _, _ = saved
    assert batchnorm_modes(checkpoint.restore(None, directory, train=True)) == {False}


def test_a_flipped_bit_is_refused_naming_the_array(saved, tmp_path):
    _, directory, _, _ = saved
    copy = tmp_path / "model"
    shutil.copytree(directory, copy)
    largest = max(
        (p for p in (copy / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size
    )
    data = bytearray(largest.read_bytes())
    data[len(data) // 2] ^= 0x40  # raw array bytes: orbax itself reads this without complaint
    largest.write_bytes(bytes(data))
    with pytest.raises(checkpoint.CheckpointIntegrityError) as info:
        checkpoint.restore(None, copy)
    message = str(info.value)
    assert str(copy / "state") in message and "\n" not in message
    assert re.search(r"array '[\w.]+' has sha256 [0-9a-f]{64}, but flax_attention.json", message)


def test_old_format_without_checksums_still_restores(saved, tmp_path):
    model, directory, _, _ = saved
    copy = tmp_path / "model"
    shutil.copytree(directory, copy)
    meta_file = copy / checkpoint.METADATA_FILE
    meta = json.loads(meta_file.read_text())
    for field in ("arrays", "dataset", "image_size"):
        del meta[field]
    meta_file.write_text(json.dumps({**meta, "format": 1}))
    assert checkpoint.read_metadata(copy)["dataset"] is None
    restored = checkpoint.restore(None, copy)
    for variable in ("bn1.var", "fc.kernel", "stage_attention.0.spatial.final.kernel"):
        np.testing.assert_array_equal(
            np.asarray(nnx_path(restored, variable)), np.asarray(nnx_path(model, variable))
        )


def _edit(meta: dict, **fields) -> str:
    return json.dumps({**meta, **fields})


BAD_METADATA = {
    "truncated": (lambda text, meta: text[: len(text) // 2], "not valid JSON"),
    "empty": (lambda text, meta: "", "not valid JSON"),
    "binary": (lambda text, meta: "\udcff", "not UTF-8"),
    "list": (lambda text, meta: "[1, 2]", "must hold a JSON object, not list"),
    "format 999": (lambda text, meta: _edit(meta, format=999), "field 'format' is 999"),
    "format string": (lambda text, meta: _edit(meta, format="2"), "field 'format' is '2'"),
    "no format": (
        lambda text, meta: json.dumps({k: v for k, v in meta.items() if k != "format"}),
        "field 'format' is missing",
    ),
    "no arrays": (
        lambda text, meta: json.dumps({k: v for k, v in meta.items() if k != "arrays"}),
        "field 'arrays' is missing",
    ),
    "args list": (
        lambda text, meta: _edit(meta, constructor_args=[5]),
        "field 'constructor_args' must be an object",
    ),
    "model int": (lambda text, meta: _edit(meta, model=3), "field 'model' must be"),
    "model unknown": (lambda text, meta: _edit(meta, model="vgg"), "field 'model' is 'vgg'"),
    "bad args": (
        lambda text, meta: _edit(meta, constructor_args={"colour": 1}),
        "field 'constructor_args' does not build",
    ),
    "image_size 0": (lambda text, meta: _edit(meta, image_size=0), "field 'image_size' must"),
    "array record": (
        lambda text, meta: _edit(meta, arrays={**meta["arrays"], "bn1.var": {"dtype": 1}}),
        "field 'arrays.bn1.var' must be",
    ),
}


@pytest.mark.parametrize("case", BAD_METADATA, ids=list(BAD_METADATA))
def test_every_metadata_problem_is_one_message_naming_file_and_field(saved, tmp_path, case):
    _, directory, _, _ = saved
    text = (directory / checkpoint.METADATA_FILE).read_text()
    corrupt, expected = BAD_METADATA[case]
    copy = tmp_path / "model"
    (copy / checkpoint.STATE_DIR).mkdir(parents=True)  # the arrays are never reached
    meta_file = copy / checkpoint.METADATA_FILE
    written = corrupt(text, json.loads(text))
    meta_file.write_bytes(written.encode("utf-8", "surrogateescape"))
    with pytest.raises(checkpoint.CheckpointMetadataError) as info:
        checkpoint.restore(None, copy)
    message = str(info.value)
    assert message.startswith(f"{meta_file}: ") and expected in message and "\n" not in message


def test_a_failed_save_leaves_nothing(saved, tmp_path, monkeypatch):
    model, directory, _, _ = saved

    def failing_checkpointer():
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "_host_local_checkpointer", failing_checkpointer)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save(model, tmp_path / "new" / "parents" / "model")
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save(model, directory, overwrite=True)
    assert list(tmp_path.iterdir()) == []
    assert [p.name for p in directory.parent.iterdir()] == [directory.name]
    assert checkpoint.read_metadata(directory)["model"] == NAME
