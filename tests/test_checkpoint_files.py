"""Reading PyTorch checkpoint files: .pth/.pth.tar, .safetensors, .npz."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from flax_attention.convert import load_torch_checkpoint

STATE = {"fc.0.weight": np.arange(12, dtype=np.float32).reshape(3, 4), "fc.0.bias": np.ones(3)}


def _torch_state():
    return {k: torch.from_numpy(np.array(v)) for k, v in STATE.items()}


def _check(loaded):
    assert set(loaded) == set(STATE)
    for key, value in STATE.items():
        np.testing.assert_array_equal(loaded[key], value)


@pytest.mark.parametrize(
    "wrap",
    [
        lambda s: s,
        lambda s: {"state_dict": {f"module.{k}": v for k, v in s.items()}, "epoch": 3},
        lambda s: {"model": s, "optimizer": {}},
    ],
    ids=["plain", "state_dict+module", "model"],
)
@pytest.mark.parametrize("suffix", [".pth", ".pth.tar"])
def test_torch_files(tmp_path, wrap, suffix):
    path = tmp_path / f"ckpt{suffix}"
    torch.save(wrap(_torch_state()), path)
    _check(load_torch_checkpoint(path))


def test_safetensors_and_npz(tmp_path):
    save_file({k: np.ascontiguousarray(v) for k, v in STATE.items()}, tmp_path / "w.safetensors")
    _check(load_torch_checkpoint(tmp_path / "w.safetensors"))
    np.savez(tmp_path / "w.npz", **STATE)
    _check(load_torch_checkpoint(tmp_path / "w.npz"))


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint file"):
        load_torch_checkpoint(tmp_path / "nope.pth")


@pytest.mark.parametrize("name", ["junk.pth", "junk.safetensors", "junk.npz", "junk.ckpt"])
def test_unreadable_file(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"this is not a checkpoint")
    with pytest.raises(ValueError, match=r"accepted"):
        load_torch_checkpoint(path)
