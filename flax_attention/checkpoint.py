"""Save and restore models with orbax-checkpoint, plus JSON metadata that rebuilds them.

A checkpoint directory holds `state/` (orbax StandardCheckpointer over the model's variables,
BatchNorm statistics included, as a nested dict) and `flax_attention.json` (written and read by
`flax_attention.checkpoint_metadata`): model name, constructor arguments, PyTorch layout, sha256
of the converted file, the dataset (and input size) the model was trained on, versions, and the
dtype, shape and sha256 of every array of `state/`. A restore recomputes those checksums and
refuses any array that differs, so a flipped bit is an error, not a wrong weight. A save is
written to a temporary sibling directory and renamed into place, so an interrupted save never
leaves a half checkpoint under `directory`. A save replaces only a model checkpoint (a directory
holding nothing but `state/` and `flax_attention.json`): never another directory, a file, the
current directory or one of its ancestors, nor a directory holding the source weights.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from flax_attention.checkpoint_metadata import (
    METADATA_FILE,
    STATE_DIR,
    CheckpointMetadataError,
    array_record,
    check_metadata,
    make_metadata,
    model_constructor_args,
    read_metadata,
    sha256_of,
)
from flax_attention.models.registry import MODELS, REMOVED_ARGS, create_model

__all__ = [
    "METADATA_FILE",
    "STATE_DIR",
    "CheckpointIntegrityError",
    "CheckpointMetadataError",
    "OutputRefusedError",
    "array_record",
    "check_replaceable",
    "read_metadata",
    "restore",
    "save",
    "sha256_of",
]


class CheckpointIntegrityError(ValueError):
    """An array read back from `state/` differs from the dtype, shape or sha256 recorded at save
    (or cannot be read at all); the message names the directory and the array."""


class OutputRefusedError(FileExistsError):
    """A path `save` will not write or replace because it holds something not ours; the
    message names the path and why."""


OWN_ENTRIES = frozenset({STATE_DIR, METADATA_FILE})  # everything a model checkpoint holds


def check_replaceable(directory: str | os.PathLike, *, keep: Iterable[os.PathLike] = ()) -> None:
    """Raise `OutputRefusedError` unless `save(..., overwrite=True)` may write `directory`:
    it must not exist, be empty, or be a model checkpoint holding only `state/` and
    `flax_attention.json`; never a file or link, the current directory or one of its
    ancestors, nor a directory holding one of the paths `keep` (e.g. the source weights)."""
    path = Path(directory).absolute()
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        kind = "a link" if path.is_symlink() else "a file"
        raise OutputRefusedError(f"{directory} is {kind}, not a model checkpoint directory")
    real = path.resolve()
    if real == Path.cwd().resolve() or real in Path.cwd().resolve().parents:
        raise OutputRefusedError(
            f"{directory} is the current directory or one of its ancestors; "
            "choose another output directory"
        )
    for kept in map(Path, keep):
        if real == kept.resolve() or real in kept.resolve().parents:
            raise OutputRefusedError(f"{directory} holds {kept}; choose another output directory")
    if not path.exists():
        return
    foreign = sorted(p.name for p in path.iterdir() if p.name not in OWN_ENTRIES)
    if foreign or (any(path.iterdir()) and not (path / METADATA_FILE).is_file()):
        held = f"holds {foreign[0]!r}" if foreign else f"has no {METADATA_FILE}"
        raise OutputRefusedError(
            f"{directory} is not a flax-attention model checkpoint ({held}); refusing to "
            "replace it: move it away or choose another output directory"
        )


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
    dataset: str | None = None,
    image_size: int | None = None,
    overwrite: bool = False,
) -> Path:
    """Write `model`'s variables and metadata to `directory` (atomically); returns its path.

    `name` and `constructor_args` (JSON values, e.g. `{"num_classes": 10}`) let
    `restore(None, directory)` rebuild the model with `create_model(name, **constructor_args)`.
    `dataset` (a `flax_attention.data` name) and `image_size` record the preprocessing the model
    expects (`flax-attention predict` uses them). An existing `directory` is an error unless
    `overwrite=True`; it is replaced only once the new checkpoint is complete, and only if
    `check_replaceable(directory, keep=[source_file])` passes (else `OutputRefusedError`).
    """
    directory = Path(directory).absolute()
    if directory.exists() and not overwrite:
        raise FileExistsError(f"{directory} already exists; pass overwrite=True to replace it")
    check_replaceable(directory, keep=[source_file] if source_file is not None else [])
    arrays = jax.device_get(nnx.to_pure_dict(nnx.state(model)))
    metadata = make_metadata(
        _flat(arrays),
        name=name,
        constructor_args=constructor_args,
        layout=layout,
        source_file=source_file,
        dataset=dataset,
        image_size=image_size,
    )
    text = json.dumps(metadata, indent=2)  # fails before anything is written
    check_metadata(json.loads(text), directory / METADATA_FILE)

    created = [p for p in directory.parents if not p.exists()]  # removed again on failure
    tmp = directory.parent / f".{directory.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        with _host_local_checkpointer() as checkpointer:
            checkpointer.save(tmp / STATE_DIR, arrays)
            checkpointer.wait_until_finished()
        (tmp / METADATA_FILE).write_text(text)
        _move_into_place(tmp, directory)
    except BaseException:
        shutil.rmtree(created[-1] if created else tmp, ignore_errors=True)
        raise
    return directory


def _move_into_place(tmp: Path, directory: Path) -> None:
    """Rename `tmp` to `directory`; an existing `directory` (checked replaceable) is moved
    aside first, put back if the rename fails, and deleted once `tmp` is in its place."""
    if not directory.exists():
        tmp.rename(directory)
        return
    old = directory.parent / f".{directory.name}.old-{uuid.uuid4().hex[:8]}"
    directory.rename(old)
    try:
        tmp.rename(directory)
    except BaseException:
        old.rename(directory)
        raise
    shutil.rmtree(old)


def restore(
    name_or_model: str | nnx.Module | None,
    directory: str | os.PathLike,
    *,
    train: bool = False,
) -> nnx.Module:
    """Load checkpoint `directory` into a model and return it, in evaluation mode (BatchNorm
    uses its running statistics) unless `train=True`.

    `None`: rebuild the model named in the metadata; a name: the same, checked against the
    metadata; a model: fill it in place (and set its mode). Only the arrays of `directory` are
    read: constructor arguments that name other weights (`pretrained`) are ignored, so the
    metadata never makes a restore read another file or fetch from the Hub; removed ones
    (`REMOVED_ARGS`: `impl`) are ignored too. Every array is
    checked against the dtype, shape and sha256 recorded at save (`CheckpointIntegrityError`
    naming the array); shape or structure differences from the model raise ValueError naming
    every differing path.
    """
    metadata = read_metadata(directory)
    metadata_path = Path(directory) / METADATA_FILE
    saved_name = metadata["model"]
    if isinstance(name_or_model, nnx.Module):
        model = name_or_model
    else:
        name = name_or_model or saved_name
        if name is None:
            raise ValueError(f"{directory} records no model name; pass a model to restore into")
        if saved_name is not None and name != saved_name:
            raise ValueError(f"{directory} holds model {saved_name!r}, not {name!r}")
        if name not in MODELS:
            raise CheckpointMetadataError(
                f"{metadata_path}: field 'model' is {name!r}, not a registered model "
                f"(known: {', '.join(sorted(MODELS))})"
            )
        args = model_constructor_args(metadata)
        args = {key: value for key, value in args.items() if key not in REMOVED_ARGS}
        try:
            model = nnx.eval_shape(lambda: create_model(name, rngs=nnx.Rngs(0), **args))
        except TypeError as err:
            raise CheckpointMetadataError(
                f"{metadata_path}: field 'constructor_args' does not build {name!r}: {err}"
            ) from None

    state_dir = Path(directory).absolute() / STATE_DIR
    try:
        with _host_local_checkpointer() as checkpointer:
            saved = checkpointer.restore(state_dir)
    except Exception as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise CheckpointIntegrityError(
            f"{state_dir}: orbax cannot read the arrays ({type(err).__name__}: {first_line})"
        ) from err
    if "arrays" in metadata:
        _verify(_flat(saved), metadata["arrays"], state_dir)
    state = nnx.state(model)
    nnx.replace_by_pure_dict(state, _checked(nnx.to_pure_dict(state), saved, directory))
    nnx.update(model, state)
    model.train() if train else model.eval()
    return model


def _paths(tree: dict) -> dict[tuple[str, ...], Any]:
    """{("a", "b", "0"): leaf} of a nested dict (integer keys become digit strings)."""
    flat = nnx.traversals.flatten_mapping(tree)
    return {tuple(map(str, path)): v for path, v in flat.items()}


def _flat(tree: dict) -> dict[str, Any]:
    """{"a.b.0": leaf} of a nested dict: the array names the metadata records."""
    return {".".join(path): v for path, v in _paths(tree).items()}


def _verify(saved: dict[str, Any], recorded: dict[str, dict], state_dir: Path) -> None:
    """Raise `CheckpointIntegrityError` naming the first array of `saved` that differs from its
    recorded dtype, shape or sha256, or that is missing on either side."""
    missing, unrecorded = (
        sorted(recorded.keys() - saved.keys()),
        sorted(saved.keys() - recorded.keys()),
    )
    if missing:
        raise CheckpointIntegrityError(
            f"{state_dir}: array {missing[0]!r} recorded in {METADATA_FILE} is missing"
        )
    if unrecorded:
        raise CheckpointIntegrityError(
            f"{state_dir}: array {unrecorded[0]!r} is not recorded in {METADATA_FILE}"
        )
    for key in sorted(saved):
        got, want = array_record(saved[key]), recorded[key]
        for part in ("dtype", "shape", "sha256"):
            if got[part] != want[part]:
                raise CheckpointIntegrityError(
                    f"{state_dir}: array {key!r} has {part} {got[part]}, but {METADATA_FILE} "
                    f"recorded {want[part]} at save: the checkpoint is corrupt or was modified"
                )


def _checked(expected: dict, saved: dict, directory) -> dict:
    """`saved` cast to the dtypes of `expected`; ValueError listing every differing path."""
    want, got = _paths(expected), _paths(saved)
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
