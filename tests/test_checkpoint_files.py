"""Reading PyTorch checkpoint files: .pth/.pth.tar, .safetensors, .npz; wrappers and prefixes."""

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
        lambda s: {"net": {f"module.module.{k}": v for k, v in s.items()}},
        lambda s: {"model": {"state_dict": s, "epoch": 3}},
    ],
    ids=["plain", "state_dict+module", "model", "net+module.module", "model.state_dict"],
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


def test_unrecognised_wrapper_names_the_entries_found(tmp_path):
    path = tmp_path / "ckpt.pth"
    torch.save({"ema_weights": _torch_state(), "epoch": 3}, path)
    with pytest.raises(ValueError) as info:
        load_torch_checkpoint(path)
    message = str(info.value)
    assert "holds no tensors at its top level" in message
    assert "'ema_weights' (dict of 2 entries), 'epoch' (int)" in message and "--key" in message
    _check(load_torch_checkpoint(path, key="ema_weights"))
    with pytest.raises(ValueError, match=r"no entry 'ema' holding tensors; top level: 'ema_w"):
        load_torch_checkpoint(path, key="ema")


def test_key_descends_into_nested_entries(tmp_path):
    path = tmp_path / "ckpt.pth"
    torch.save({"state_dict": {"bad": torch.zeros(1)}, "ema": {"net": _torch_state()}}, path)
    _check(load_torch_checkpoint(path, key="ema.net"))
