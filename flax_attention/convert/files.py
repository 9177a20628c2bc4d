"""Read PyTorch checkpoints from disk as {key: numpy array}."""

from __future__ import annotations

import os
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from flax_attention.convert.state_dict import strip_data_parallel_prefix, to_numpy

# Entries that training scripts wrap a state_dict in, tried in this order (nested ones too).
WRAPPER_KEYS = ("state_dict", "model", "net", "module")


def _read_torch(path: Path) -> Any:
    import torch  # only .pth files need torch

    return torch.load(path, map_location="cpu", weights_only=True)


def check_archive(path: Path) -> None:
    """Raise `ValueError` naming `path` if it is a zip archive (torch's format since 1.6) with
    a damaged member: one whose data does not match its CRC-32. Other files are not checked."""
    if not zipfile.is_zipfile(path):
        return
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        raise ValueError(
            f"{path} is a damaged zip archive ({err}); copy or download it again"
        ) from err
    if damaged is not None:
        raise ValueError(
            f"{path} is damaged: its member {damaged} fails the archive's CRC check; "
            "copy or download it again"
        )


def _read_safetensors(path: Path) -> dict:
    from safetensors.numpy import load_file

    return load_file(path)


def _read_npz(path: Path) -> dict:
    with np.load(path, allow_pickle=False) as archive:
        return {key: archive[key] for key in archive.files}


READERS: dict[str, Callable[[Path], Any]] = {
    ".pth": _read_torch,
    ".pt": _read_torch,
    ".tar": _read_torch,  # .pth.tar
    ".bin": _read_torch,
    ".safetensors": _read_safetensors,
    ".npz": _read_npz,
}


def _describe(entries: Mapping) -> str:
    """`'ema' (dict of 122 entries), 'epoch' (int)`: what a mapping holds, for error messages."""

    def kind(value: Any) -> str:
        if isinstance(value, Mapping):
            return f"dict of {len(value)} entries"
        if hasattr(value, "shape"):
            return f"tensor {tuple(value.shape)}"
        return type(value).__name__

    shown = [f"{key!r} ({kind(value)})" for key, value in list(entries.items())[:12]]
    more = f", ... ({len(entries) - 12} more)" if len(entries) > 12 else ""
    return ", ".join(shown) + more


def load_torch_checkpoint(
    path: str | os.PathLike, *, key: str | None = None
) -> dict[str, np.ndarray]:
    """Read a `.pth`/`.pth.tar` (torch, weights_only), `.safetensors` or `.npz` state_dict.

    `key` picks the entry holding the weights (e.g. `"state_dict_ema"`; dots descend into nested
    entries). Without it, `state_dict`/`model`/`net`/`module` wrapper entries are unwrapped.
    DataParallel `module.` prefixes (repeated ones too) are stripped; returns numpy arrays.
    `.safetensors` and `.npz` do not need torch. A file with no tensors where the weights were
    looked for is refused with a ValueError naming the entries found there.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file at {path}")
    reader = READERS.get(path.suffix)
    if reader is None:
        raise ValueError(f"{path}: unknown checkpoint format; accepted: {sorted(READERS)}")
    if reader is _read_torch:
        check_archive(path)
    try:
        state = reader(path)
    except Exception as err:
        raise ValueError(
            f"{path} is not a readable {path.suffix} checkpoint ({type(err).__name__}: {err}); "
            f"accepted formats: {sorted(READERS)}"
        ) from err
    if not isinstance(state, Mapping) or not state:
        raise ValueError(f"{path} holds no state_dict (a non-empty mapping of name -> tensor)")

    where = []
    for part in key.split(".") if key else []:
        if not isinstance(state.get(part), Mapping):
            raise ValueError(
                f"{path} has no entry {'.'.join([*where, part])!r} holding tensors; "
                f"{'.'.join(where) or 'top level'}: {_describe(state)}"
            )
        state, where = state[part], [*where, part]
    while not key and (wrapper := _wrapper(state)):
        state, where = state[wrapper], [*where, wrapper]

    tensors = {
        strip_data_parallel_prefix(name): to_numpy(value)
        for name, value in state.items()
        if hasattr(value, "shape")
    }
    if not tensors:
        place = f"under {'.'.join(where)!r}" if where else "at its top level"
        raise ValueError(
            f"{path} holds no tensors {place}; it has {_describe(state)}. "
            "Pick the entry holding the weights (convert --key NAME, load_torch_checkpoint(key=))"
        )
    return tensors


def _wrapper(state: Mapping) -> str | None:
    """The first of WRAPPER_KEYS whose entry in `state` is itself a mapping, if any."""
    return next((k for k in WRAPPER_KEYS if isinstance(state.get(k), Mapping)), None)
