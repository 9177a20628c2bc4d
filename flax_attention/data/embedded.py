"""The embedded default dataset: scikit-learn's handwritten digits as a tfds array_record dataset.

``sklearn.datasets.load_digits`` ships 1797 8x8 grayscale images of the digits 0-9 inside the
scikit-learn wheel, so this dataset needs no download. ``build_digits`` writes it once into a tfds
``data_dir`` with a fixed stratified split (1437 train / 360 test), after which
``tfds.data_source("flax_attention_digits", split=..., data_dir=...)`` serves it exactly like a
locally prepared CIFAR or ImageNet.

Writing goes through a regular tfds ``GeneratorBasedBuilder`` with ``file_format="array_record"``:
tfds prepares into an ``incomplete.*`` directory and renames it into place only when finished, so
an interrupted build is never mistaken for a finished one. Two choices keep TensorFlow out:
``tfds.dataset_builders.store_as_tfds_dataset`` is not used because it imports TensorFlow to
type-check its inputs, and images are stored as ``tfds.features.Tensor`` (raw uint8 8x8x1)
because ``tfds.features.Image`` needs TensorFlow to PNG-encode numpy arrays.
"""

import functools
from pathlib import Path

import numpy as np

NAME = "flax_attention_digits"
VERSION = "1.0.0"
NUM_TEST = 360
SPLIT_SEED = 0


def digits_arrays() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The deterministic split: {"train": (images, labels), "test": (images, labels)}.

    images: uint8 (N, 8, 8, 1), the 0..16 intensities scaled to 0..255; labels: int64 (N,).
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = np.round(digits.images * (255 / 16)).astype(np.uint8)[..., None]
    train, test = train_test_split(
        np.arange(len(images)),
        test_size=NUM_TEST,
        stratify=digits.target,
        random_state=SPLIT_SEED,
    )
    return {
        split: (images[idx], digits.target[idx])
        for split, idx in (("train", train), ("test", test))
    }


@functools.cache
def _builder_class() -> type:
    """The tfds builder, defined lazily so that importing this module does not import tfds."""
    import tensorflow_datasets as tfds

    class FlaxAttentionDigits(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        name = NAME
        # No code directory to look up (that lookup needs importlib_resources, which tfds does
        # not install): no checksums file, and nothing is downloaded anyway.
        code_path = None
        VERSION = tfds.core.Version(VERSION)  # The module constant: class scope is not yet bound.

        def _info(self) -> tfds.core.DatasetInfo:
            return tfds.core.DatasetInfo(
                builder=self,
                description=__doc__,
                features=tfds.features.FeaturesDict(
                    {
                        "image": tfds.features.Tensor(shape=(8, 8, 1), dtype=np.uint8),
                        "label": tfds.features.ClassLabel(num_classes=10),
                    }
                ),
                supervised_keys=("image", "label"),
                disable_shuffling=True,
            )

        def _split_generators(self, dl_manager):
            del dl_manager
            return {
                split: self._generate_examples(images, labels)
                for split, (images, labels) in digits_arrays().items()
            }

        def _generate_examples(self, images, labels):
            for i, (image, label) in enumerate(zip(images, labels, strict=True)):
                yield i, {"image": image, "label": int(label)}

    return FlaxAttentionDigits


def build_digits(data_dir: str | Path) -> None:
    """Write the digits dataset as array_record under ``data_dir/flax_attention_digits/1.0.0``.

    A no-op when it is already there. Concurrent builders are safe: each prepares into its own
    temporary directory and only one rename wins.
    """
    import tensorflow_datasets as tfds

    builder = _builder_class()(data_dir=str(data_dir), file_format="array_record")
    if builder.is_prepared():
        return
    config = tfds.download.DownloadConfig(try_download_gcs=False)
    try:
        builder.download_and_prepare(download_config=config)
    except OSError:
        if not builder.is_prepared():  # Not lost a rename race: a real failure.
            raise
