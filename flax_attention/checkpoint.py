"""Save and restore models with orbax-checkpoint, plus JSON metadata that rebuilds them.

A checkpoint directory holds `state/` (orbax StandardCheckpointer over the model's variables,
BatchNorm statistics included, as a nested dict) and `flax_attention.json`: model name,
constructor arguments, PyTorch layout, sha256 of the converted file, the dataset (and input
size) the model was trained on, versions, and the dtype, shape and sha256 of every array of
`state/`. A restore recomputes those checksums and refuses any array that differs, so a flipped
bit is an error, not a wrong weight. A save is written to a temporary sibling directory and
renamed into place, so an interrupted save never leaves a half checkpoint under `directory`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from flax_attention import __version__
from flax_attention.models.registry import MODELS, create_model

METADATA_FILE = "flax_attention.json"
STATE_DIR = "state"
FORMAT_VERSION = 2  # 2: per-array checksums, dataset and image_size. 1: neither (read unverified).
READABLE_FORMATS = (1, 2)


class CheckpointMetadataError(ValueError):
    """`flax_attention.json` is unreadable, not an object, of an unknown format, or one of its
    fields is missing or ill-typed; the message names the file and the field."""


class CheckpointIntegrityError(ValueError):
    """An array read back from `state/` differs from the dtype, shape or sha256 recorded at save
    (or cannot be read at all); the message names the directory and the array."""


def sha256_of(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def array_record(value: Any) -> dict[str, Any]:
    """{"dtype", "shape", "sha256"} of an array: its dtype name, shape, and the sha256 of its
    bytes in C order (what the metadata records for every array)."""
    array = np.ascontiguousarray(np.asarray(value))
    return {
        "dtype": array.dtype.name,
        "shape": list(array.shape),
        "sha256": hashlib.sha256(array.reshape(-1).view(np.uint8)).hexdigest(),
    }


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
    `overwrite=True`; it is replaced only once the new checkpoint is complete.
    """
    directory = Path(directory).absolute()
    if directory.exists() and not overwrite:
        raise FileExistsError(f"{directory} already exists; pass overwrite=True to replace it")
    arrays = jax.device_get(nnx.to_pure_dict(nnx.state(model)))
    metadata = {
        "format": FORMAT_VERSION,
        "model": name,
        "constructor_args": dict(constructor_args or {}),
        "layout": layout,
        "source_file": None,
        "dataset": dataset,
        "image_size": image_size,
        "flax_attention_version": __version__,
        "jax_version": jax.__version__,
        "arrays": {key: array_record(value) for key, value in _flat(arrays).items()},
    }
    if source_file is not None:
        metadata["source_file"] = {"name": Path(source_file).name, "sha256": sha256_of(source_file)}
    text = json.dumps(metadata, indent=2)  # fails before anything is written
    _check_metadata(json.loads(text), directory / METADATA_FILE)

    created = [p for p in directory.parents if not p.exists()]  # removed again on failure
    tmp = directory.parent / f".{directory.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        with _host_local_checkpointer() as checkpointer:
            checkpointer.save(tmp / STATE_DIR, arrays)
            checkpointer.wait_until_finished()
        (tmp / METADATA_FILE).write_text(text)
        if directory.exists():
            old = directory.parent / f".{directory.name}.old-{uuid.uuid4().hex[:8]}"
            directory.rename(old)
            tmp.rename(directory)
            shutil.rmtree(old)
        else:
            tmp.rename(directory)
    except BaseException:
        shutil.rmtree(created[-1] if created else tmp, ignore_errors=True)
        raise
    return directory


def read_metadata(directory: str | os.PathLike) -> dict[str, Any]:
    """The validated metadata of checkpoint `directory`.

    FileNotFoundError if `directory` is not a checkpoint; `CheckpointMetadataError` (one line
    naming the file and the field) if the JSON is unreadable, not an object, of an unknown
    `format`, or has a missing or ill-typed field. Format-1 metadata (no checksums) gets
    `dataset`/`image_size` None and no `arrays`.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"no checkpoint directory at {directory}")
    path = directory / METADATA_FILE
    if not path.is_file() or not (directory / STATE_DIR).is_dir():
        raise FileNotFoundError(
            f"{directory} is not a flax_attention checkpoint (no {METADATA_FILE} and {STATE_DIR}/)"
        )
    try:
        metadata = json.loads(path.read_bytes())
    except json.JSONDecodeError as err:
        raise CheckpointMetadataError(
            f"{path}: not valid JSON ({err.msg} at line {err.lineno} column {err.colno}); "
            "the file is truncated or corrupt"
        ) from None
    except UnicodeDecodeError as err:
        raise CheckpointMetadataError(f"{path}: not UTF-8 JSON ({err.reason})") from None
    _check_metadata(metadata, path)
    if metadata["format"] == 1:
        metadata = {"dataset": None, "image_size": None, **metadata}
    return metadata


def _is_str(v: Any) -> bool:
    return isinstance(v, str)


def _is_int(v: Any, minimum: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= minimum


def _or_null(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: v is None or check(v)


def _is_source_file(v: Any) -> bool:
    return isinstance(v, dict) and _is_str(v.get("name")) and _is_str(v.get("sha256"))


def _is_array_record(v: Any) -> bool:
    return (
        isinstance(v, dict)
        and _is_str(v.get("dtype"))
        and isinstance(v.get("shape"), list)
        and all(_is_int(n, 0) for n in v["shape"])
        and _is_str(v.get("sha256"))
    )


# field -> (check, what it must be, first format that has it)
_FIELDS: dict[str, tuple[Callable[[Any], bool], str, int]] = {
    "model": (_or_null(_is_str), "a model name or null", 1),
    "constructor_args": (lambda v: isinstance(v, dict), "an object (keyword arguments)", 1),
    "layout": (_or_null(_is_str), "a layout name or null", 1),
    "source_file": (_or_null(_is_source_file), 'null or {"name": str, "sha256": str}', 1),
    "flax_attention_version": (_is_str, "a version string", 1),
    "jax_version": (_is_str, "a version string", 1),
    "dataset": (_or_null(_is_str), "a dataset name or null", 2),
    "image_size": (_or_null(lambda v: _is_int(v, 1)), "a positive integer or null", 2),
    "arrays": (lambda v: isinstance(v, dict), "an object (array path -> record)", 2),
}


def _check_metadata(metadata: Any, path: Path) -> None:
    """Raise `CheckpointMetadataError` naming `path` and the first bad field of `metadata`."""
    if not isinstance(metadata, dict):
        raise CheckpointMetadataError(
            f"{path}: must hold a JSON object, not {type(metadata).__name__}"
        )
    fmt = metadata.get("format")
    if "format" not in metadata:
        raise CheckpointMetadataError(f"{path}: field 'format' is missing")
    if not _is_int(fmt, 0) or fmt not in READABLE_FORMATS:
        raise CheckpointMetadataError(
            f"{path}: field 'format' is {fmt!r}; this flax_attention ({__version__}) reads "
            f"formats {list(READABLE_FORMATS)} (a newer version wrote it?)"
        )
    for field, (check, meaning, since) in _FIELDS.items():
        if fmt < since:
            continue
        if field not in metadata:
            raise CheckpointMetadataError(f"{path}: field {field!r} is missing")
        if not check(metadata[field]):
            raise CheckpointMetadataError(
                f"{path}: field {field!r} must be {meaning}, not {metadata[field]!r:.80}"
            )
    for key, record in metadata.get("arrays", {}).items():
        if not _is_array_record(record):
            raise CheckpointMetadataError(
                f"{path}: field 'arrays.{key}' must be "
                f'{{"dtype": str, "shape": [int, ...], "sha256": str}}, not {record!r:.80}'
            )


def restore(
    name_or_model: str | nnx.Module | None,
    directory: str | os.PathLike,
    *,
    train: bool = False,
) -> nnx.Module:
    """Load checkpoint `directory` into a model and return it, in evaluation mode (BatchNorm
    uses its running statistics) unless `train=True`.

    `None`: rebuild the model named in the metadata; a name: the same, checked against the
    metadata; a model: fill it in place (and set its mode). Every array is checked against the
    dtype, shape and sha256 recorded at save (`CheckpointIntegrityError` naming the array);
    shape or structure differences from the model raise ValueError naming every differing path.
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
        args = metadata["constructor_args"]
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
