"""Read PyTorch checkpoints from disk as {key: numpy array}."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from flax_attention.convert.state_dict import to_numpy

WRAPPER_KEYS = ("state_dict", "model")


def _read_torch(path: Path) -> dict:
    import torch  # only .pth files need torch

    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    for key in WRAPPER_KEYS:
        if isinstance(checkpoint, dict) and isinstance(checkpoint.get(key), dict):
            checkpoint = checkpoint[key]
    return checkpoint


def _read_safetensors(path: Path) -> dict:
    from safetensors.numpy import load_file

    return load_file(path)


def _read_npz(path: Path) -> dict:
    with np.load(path, allow_pickle=False) as archive:
        return {key: archive[key] for key in archive.files}


READERS: dict[str, Callable[[Path], dict]] = {
    ".pth": _read_torch,
    ".pt": _read_torch,
    ".tar": _read_torch,  # .pth.tar
    ".bin": _read_torch,
    ".safetensors": _read_safetensors,
    ".npz": _read_npz,
}


def load_torch_checkpoint(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a `.pth`/`.pth.tar` (torch, weights_only), `.safetensors` or `.npz` state_dict.

    Unwraps `state_dict`/`model` entries and a DataParallel `module.` prefix; returns numpy
    arrays. `.safetensors` and `.npz` do not need torch.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file at {path}")
    reader = READERS.get(path.suffix)
    if reader is None:
        raise ValueError(f"{path}: unknown checkpoint format; accepted: {sorted(READERS)}")
    try:
        state = reader(path)
    except Exception as err:
        raise ValueError(
            f"{path} is not a readable {path.suffix} checkpoint ({type(err).__name__}: {err}); "
            f"accepted formats: {sorted(READERS)}"
        ) from err
    if not isinstance(state, dict) or not state:
        raise ValueError(f"{path} holds no state_dict (a non-empty mapping of name -> tensor)")
    return {
        key.removeprefix("module."): to_numpy(value)
        for key, value in state.items()
        if hasattr(value, "shape")
    }
