"""The metadata file of a checkpoint directory, `flax_attention.json`: written, read, validated.

It records what rebuilds the model (model name, constructor arguments), where its weights came
from (PyTorch layout, name and sha256 of the converted file), the dataset and input size the
model expects, versions, and the dtype, shape and sha256 of every array of `state/`. Readers
accept the formats of READABLE_FORMATS and refuse anything else with one line naming the file
and the field (`CheckpointMetadataError`).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

from flax_attention import __version__
from flax_attention.data.limits import MAX_IMAGE_SIDE

METADATA_FILE = "flax_attention.json"
STATE_DIR = "state"
FORMAT_VERSION = 2  # 2: per-array checksums, dataset and image_size. 1: neither (read unverified).
READABLE_FORMATS = (1, 2)
# create_model arguments that load weights from elsewhere: never taken from a model folder,
# whose own arrays are its weights.
WEIGHT_SOURCE_ARGS = frozenset({"pretrained"})


class CheckpointMetadataError(ValueError):
    """`flax_attention.json` is unreadable, not an object, of an unknown format, or one of its
    fields is missing or ill-typed; the message names the file and the field."""


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


def make_metadata(
    arrays: dict[str, Any],
    *,
    name: str | None,
    constructor_args: dict[str, Any] | None,
    layout: str | None,
    source_file: str | os.PathLike | None,
    dataset: str | None,
    image_size: int | None,
) -> dict[str, Any]:
    """The metadata of a new checkpoint of `arrays` ({"a.b.0": array}); see `checkpoint.save`."""
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
        "arrays": {key: array_record(value) for key, value in arrays.items()},
    }
    if source_file is not None:
        metadata["source_file"] = {"name": Path(source_file).name, "sha256": sha256_of(source_file)}
    return metadata


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
    check_metadata(metadata, path)
    if metadata["format"] == 1:
        metadata = {"dataset": None, "image_size": None, **metadata}
    return metadata


def model_constructor_args(metadata: dict[str, Any]) -> dict[str, Any]:
    """The `constructor_args` of `metadata` that rebuild the model's structure: those of
    WEIGHT_SOURCE_ARGS (which would read other weights or fetch from the Hub) left out."""
    args = metadata["constructor_args"]
    return {key: value for key, value in args.items() if key not in WEIGHT_SOURCE_ARGS}


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
    "image_size": (
        _or_null(lambda v: _is_int(v, 1) and v <= MAX_IMAGE_SIDE),
        f"a positive integer <= {MAX_IMAGE_SIDE} or null",
        2,
    ),
    "arrays": (lambda v: isinstance(v, dict), "an object (array path -> record)", 2),
}


def check_metadata(metadata: Any, path: Path) -> None:
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
