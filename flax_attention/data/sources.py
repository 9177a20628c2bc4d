"""Locating a registered dataset in a local tfds data_dir and opening it as a random-access source.

Nothing is ever downloaded: embedded datasets are built in place on first use, every other dataset
must have been prepared beforehand (``DatasetNotFoundError`` says how).
"""

import os
from collections.abc import Sequence
from pathlib import Path

from flax_attention.data.registry import get_spec

DATA_DIR_ENV = "FLAX_ATTENTION_DATA_DIR"


class DatasetNotFoundError(FileNotFoundError):
    """A dataset is not prepared (as array_record) in the tfds data_dir that was searched."""


def default_data_dir() -> Path:
    """``$FLAX_ATTENTION_DATA_DIR`` if set, else ``~/.cache/flax_attention/tfds``."""
    return Path(os.environ.get(DATA_DIR_ENV, "~/.cache/flax_attention/tfds")).expanduser()


def is_prepared(tfds_name: str, data_dir: Path) -> bool:
    """Whether ``data_dir/tfds_name`` holds a finished tfds dataset in array_record format."""
    return any(
        any(info.parent.glob(f"{tfds_name}-*.array_record-*"))
        for info in (data_dir / tfds_name).rglob("dataset_info.json")
        if "incomplete" not in info.parent.name
    )


def data_source(name: str, split: str, data_dir: str | Path | None = None) -> Sequence[dict]:
    """Random-access tfds source for a registered dataset: ``source[i]`` is
    {"image": uint8 (H, W, C) or the encoded image bytes, "label": int}.

    Datasets whose images are stored encoded (``spec.encoded_images``: JPEG/PNG) are read with
    tfds' decoding skipped; ``preprocess.record_image`` decodes them (libjpeg-turbo / OpenCV).

    ``split`` takes tfds split syntax ("train", "test[:10%]"). Embedded datasets are built into
    ``data_dir`` on first use; for the others a missing dataset raises ``DatasetNotFoundError``.
    """
    spec = get_spec(name)
    data_dir = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    if not is_prepared(spec.tfds_name, data_dir):
        if spec.build is None:
            hint = spec.prepare_hint.format(tfds_name=spec.tfds_name, data_dir=data_dir)
            raise DatasetNotFoundError(
                f"Dataset {name!r} (tfds name {spec.tfds_name!r}) is not prepared as array_record "
                f"in {data_dir / spec.tfds_name}. {hint}\n"
                f"Then pass data_dir={str(data_dir)!r} or set ${DATA_DIR_ENV}."
            )
        spec.build(data_dir)

    import tensorflow_datasets as tfds

    decoders = {"image": tfds.decode.SkipDecoding()} if spec.encoded_images else None
    return tfds.data_source(
        spec.tfds_name, split=split, data_dir=data_dir, download=False, decoders=decoders
    )
