"""Save and restore models with orbax-checkpoint, plus JSON metadata that rebuilds them.

A checkpoint directory holds `state/` (orbax StandardCheckpointer over the model's variables,
BatchNorm statistics included, as a nested dict) and `flax_attention.json` (model name,
constructor arguments, PyTorch layout, sha256 of the converted file, versions). A save is
written to a temporary sibling directory and renamed into place, so an interrupted save never
leaves a half checkpoint under `directory`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from flax_attention import __version__
from flax_attention.models.registry import create_model

METADATA_FILE = "flax_attention.json"
STATE_DIR = "state"
FORMAT_VERSION = 1


def sha256_of(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _host_local_checkpointer() -> ocp.StandardCheckpointer:
    """A checkpointer involving only this process: model files are written and read by one host
    (in a multi-host run, process 0 saves the final model alone; no cross-host barrier)."""
    me = jax.process_index()
    options = ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})
    return ocp.StandardCheckpointer(multiprocessing_options=options)


def save(
    model: nnx.Module,
    directory: str | os.PathLike,
    *,
    name: str | None = None,
    constructor_args: dict[str, Any] | None = None,
    layout: str | None = None,
    source_file: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> Path:
    """Write `model`'s variables and metadata to `directory` (atomically); returns its path.

    `name` and `constructor_args` (JSON values, e.g. `{"num_classes": 10}`) let
    `restore(None, directory)` rebuild the model with `create_model(name, **constructor_args)`.
    An existing `directory` is an error unless `overwrite=True`.
    """
    directory = Path(directory).absolute()
    if directory.exists() and not overwrite:
        raise FileExistsError(f"{directory} already exists; pass overwrite=True to replace it")
    metadata = {
        "format": FORMAT_VERSION,
        "model": name,
        "constructor_args": dict(constructor_args or {}),
        "layout": layout,
        "source_file": None,
        "flax_attention_version": __version__,
        "jax_version": jax.__version__,
    }
    if source_file is not None:
        metadata["source_file"] = {"name": Path(source_file).name, "sha256": sha256_of(source_file)}
    text = json.dumps(metadata, indent=2)  # fails before anything is written

    tmp = directory.parent / f".{directory.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        with _host_local_checkpointer() as checkpointer:
            checkpointer.save(tmp / STATE_DIR, jax.device_get(nnx.to_pure_dict(nnx.state(model))))
            checkpointer.wait_until_finished()
        (tmp / METADATA_FILE).write_text(text)
        if directory.exists():
            shutil.rmtree(directory)
        tmp.rename(directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def read_metadata(directory: str | os.PathLike) -> dict[str, Any]:
    """The metadata of checkpoint `directory`; FileNotFoundError if it is not a checkpoint."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"no checkpoint directory at {directory}")
    path = directory / METADATA_FILE
    if not path.is_file() or not (directory / STATE_DIR).is_dir():
        raise FileNotFoundError(
            f"{directory} is not a flax_attention checkpoint (no {METADATA_FILE} and {STATE_DIR}/)"
        )
    return json.loads(path.read_text())


def restore(name_or_model: str | nnx.Module | None, directory: str | os.PathLike) -> nnx.Module:
    """Load checkpoint `directory` into a model and return it.

    `None`: rebuild the model named in the metadata; a name: the same, checked against the
    metadata; a model: fill it in place. Shape or structure differences raise ValueError naming
    every differing path.
    """
    metadata = read_metadata(directory)
    saved_name = metadata.get("model")
    if isinstance(name_or_model, nnx.Module):
        model = name_or_model
    else:
        name = name_or_model or saved_name
        if name is None:
            raise ValueError(f"{directory} records no model name; pass a model to restore into")
        if saved_name is not None and name != saved_name:
            raise ValueError(f"{directory} holds model {saved_name!r}, not {name!r}")
        args = metadata.get("constructor_args", {})
        model = nnx.eval_shape(lambda: create_model(name, rngs=nnx.Rngs(0), **args))

    with _host_local_checkpointer() as checkpointer:
        saved = checkpointer.restore(Path(directory).absolute() / STATE_DIR)
    state = nnx.state(model)
    nnx.replace_by_pure_dict(state, _checked(nnx.to_pure_dict(state), saved, directory))
    nnx.update(model, state)
    return model


def _flat(tree: dict) -> dict[tuple[str, ...], Any]:
    flat = nnx.traversals.flatten_mapping(tree)
    return {tuple(map(str, path)): v for path, v in flat.items()}


def _checked(expected: dict, saved: dict, directory) -> dict:
    """`saved` cast to the dtypes of `expected`; ValueError listing every differing path."""
    want, got = _flat(expected), _flat(saved)
    problems = [f"missing in checkpoint: {'.'.join(k)}" for k in sorted(want.keys() - got.keys())]
    problems += [f"not in model: {'.'.join(k)}" for k in sorted(got.keys() - want.keys())]
    problems += [
        f"shape mismatch: {'.'.join(k)}: model {tuple(want[k].shape)}, "
        f"checkpoint {tuple(got[k].shape)}"
        for k in sorted(want.keys() & got.keys())
        if tuple(want[k].shape) != tuple(got[k].shape)
    ]
    if problems:
        raise ValueError(f"checkpoint {directory} does not fit the model:\n" + "\n".join(problems))
    out = {k: jnp.asarray(np.asarray(v), dtype=want[k].dtype) for k, v in got.items()}
    return nnx.traversals.unflatten_mapping(out)
