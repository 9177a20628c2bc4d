"""A model folder's metadata is data: restoring it (`restore`, `eval`, `predict`) reads only the
folder's own arrays, never weights that `constructor_args` name, never the Hub."""

from __future__ import annotations

import json

import huggingface_hub
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from flax_attention import checkpoint
from flax_attention.cli import main as cli_main
from flax_attention.convert import to_torch_state_dict
from flax_attention.models import create_model, pretrained, registry

TINY = "tiny_se_resnet"


pytestmark = pytest.mark.usefixtures("tiny_model")


@pytest.fixture
def nothing_read(monkeypatch):
    """Any attempt to read pretrained weights or reach the Hub fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"weights were read: {args} {kwargs}")

    monkeypatch.setattr(registry, "read_weights", refuse)
    monkeypatch.setattr(pretrained, "read_weights", refuse)
    monkeypatch.setattr(pretrained, "resolve_weights", refuse)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", refuse)


def saved_folder(tmp_path, *, pretrained_source) -> tuple[nnx.Module, object]:
    """A tiny digits model saved to a folder whose metadata was edited to name
    `pretrained_source` in its constructor arguments; (the model, the folder)."""
    args = {"num_classes": 10, "in_channels": 1}
    model = create_model(TINY, rngs=nnx.Rngs(3), **args)
    folder = checkpoint.save(
        model, tmp_path / "model", name=TINY, constructor_args=args, dataset="digits", image_size=16
    )
    path = folder / checkpoint.METADATA_FILE
    metadata = json.loads(path.read_text())
    metadata["constructor_args"]["pretrained"] = pretrained_source
    path.write_text(json.dumps(metadata))
    return model, folder


def other_weights_file(tmp_path) -> str:
    other = create_model(TINY, num_classes=10, in_channels=1, rngs=nnx.Rngs(99))
    path = tmp_path / "other.npz"
    np.savez(path, **to_torch_state_dict(other, layout="official"))
    return str(path)


@pytest.mark.parametrize("source", ["file", "hf-hub:someone/weights", True])
def test_restore_reads_only_the_folders_arrays(tmp_path, nothing_read, source):
    source = other_weights_file(tmp_path) if source == "file" else source
    model, folder = saved_folder(tmp_path, pretrained_source=source)
    restored = checkpoint.restore(None, folder)
    want = nnx.to_pure_dict(nnx.state(model))
    got = nnx.to_pure_dict(nnx.state(restored))
    flat_want = nnx.traversals.flatten_mapping(want)
    flat_got = nnx.traversals.flatten_mapping(got)
    assert flat_got.keys() == flat_want.keys()
    for key, value in flat_want.items():
        np.testing.assert_array_equal(np.asarray(flat_got[key]), np.asarray(value))


def test_predict_reads_only_the_folders_arrays(tmp_path, nothing_read, capsys):
    _, folder = saved_folder(tmp_path, pretrained_source=other_weights_file(tmp_path))
    image = tmp_path / "digit.png"
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(image)
    assert cli_main(["predict", str(folder), str(image)]) == 0
    assert capsys.readouterr().out.startswith(f"{image}: ")
