"""A synthetic, photo-like JPEG dataset written in tfds' ``imagenet2012`` layout.

For measuring and testing the ImageNet input path where ImageNet itself is not at hand: the
images are JPEGs of ImageNet-like dimensions and file sizes (a smooth colour field, mid-frequency
structure and fine grain, quality 90: about 80-110 KB at 500x400), stored exactly as
``tfds build imagenet2012 --file_format array_record`` stores real ones (``Image`` feature with
JPEG bytes, ``ClassLabel(1000)``, ``file_name``), so ``make_loader("imagenet2012", ...)`` reads
them unchanged. Deterministic in ``seed``.

With ``odd_images`` the training split also holds the kinds of image real ImageNet has that a
set of 333-500 px JPEGs never meets (``ODD_KINDS``, the first records of the split): CMYK JPEGs,
grayscale JPEGs, a PNG stored as a .JPEG and one large JPEG (``large_side`` px on its long
side, over 4000 by default).
"""

import io
from pathlib import Path

import numpy as np

TFDS_NAME = "imagenet2012"
TFDS_VERSION = "5.1.0"
NUM_CLASSES = 1000


def photo(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A photo-like uint8 (height, width, 3) RGB image drawn from ``rng``."""
    import cv2

    coarse = rng.integers(0, 256, (max(height // 64, 2), max(width // 64, 2), 3), np.uint8)
    image = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC).astype(np.float32)
    detail = rng.normal(0.0, 1.0, (max(height // 8, 2), max(width // 8, 2), 3)).astype(np.float32)
    image += 25.0 * cv2.resize(detail, (width, height), interpolation=cv2.INTER_LINEAR)
    image += rng.normal(0.0, 7.0, (height, width, 1)).astype(np.float32)
    return np.clip(image, 0, 255).astype(np.uint8)


def encode_jpeg(image: np.ndarray, quality: int = 90) -> bytes:
    """JPEG bytes of uint8 (H, W, 3) RGB ``image`` (libjpeg-turbo, 4:2:0)."""
    import simplejpeg

    return simplejpeg.encode_jpeg(image, quality=quality, colorspace="RGB")


# The odd records at the start of the training split, in order.
ODD_KINDS = ("cmyk", "cmyk", "gray", "gray", "png", "large")
LARGE_SIDE = 4200


def encode_odd(kind: str, image: np.ndarray, quality: int = 90) -> bytes:
    """uint8 (H, W, 3) RGB ``image`` encoded as one of the odd kinds: "cmyk" (an Adobe CMYK
    JPEG, as Pillow writes it), "gray" (a one-channel JPEG of its luma), "png" (PNG bytes),
    "large" (an RGB JPEG)."""
    from PIL import Image

    if kind == "large":
        return encode_jpeg(image, quality)
    buffer = io.BytesIO()
    if kind == "cmyk":
        Image.fromarray(image).convert("CMYK").save(buffer, "JPEG", quality=quality)
    elif kind == "gray":
        Image.fromarray(image).convert("L").save(buffer, "JPEG", quality=quality)
    elif kind == "png":
        Image.fromarray(image).save(buffer, "PNG")
    else:
        raise ValueError(f"unknown odd image kind {kind!r}; choose one of {sorted(set(ODD_KINDS))}")
    return buffer.getvalue()


def write_photo_dataset(
    data_dir: str | Path,
    *,
    num_train: int,
    num_eval: int,
    heights: tuple[int, int] = (333, 500),
    widths: tuple[int, int] = (375, 500),
    quality: int = 90,
    seed: int = 0,
    odd_images: bool = False,
    large_side: int = LARGE_SIDE,
) -> Path:
    """Write ``num_train`` / ``num_eval`` photos as tfds ``imagenet2012`` (splits ``train`` /
    ``validation``) into ``data_dir``; returns the dataset's directory. Sizes are drawn
    uniformly from ``heights`` x ``widths`` (inclusive); labels cycle over the 1000 classes.
    ``odd_images``: the first ``len(ODD_KINDS)`` training records are of those kinds (the
    large one ``large_side`` x 3/4 of it). A no-op when it is already prepared (whatever
    these arguments)."""
    import tensorflow_datasets as tfds

    class Imagenet2012(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        name = TFDS_NAME
        VERSION = tfds.core.Version(TFDS_VERSION)
        code_path = None  # Nothing to download: no checksums file to look up.

        def _info(self) -> tfds.core.DatasetInfo:
            features = {
                "image": tfds.features.Image(encoding_format="jpeg"),
                "label": tfds.features.ClassLabel(num_classes=NUM_CLASSES),
                "file_name": tfds.features.Text(),
            }
            return tfds.core.DatasetInfo(
                builder=self,
                description=__doc__,
                features=tfds.features.FeaturesDict(features),
                supervised_keys=("image", "label"),
            )

        def _split_generators(self, dl_manager):
            del dl_manager
            return {
                "train": self._generate_examples("train", num_train, seed),
                "validation": self._generate_examples("validation", num_eval, seed + 1),
            }

        def _generate_examples(self, split: str, count: int, split_seed: int):
            rng = np.random.default_rng(split_seed)
            odd = ODD_KINDS if odd_images and split == "train" else ()
            for i in range(count):
                height = int(rng.integers(heights[0], heights[1] + 1))
                width = int(rng.integers(widths[0], widths[1] + 1))
                kind = odd[i] if i < len(odd) else None
                if kind == "large":
                    height, width = large_side * 3 // 4, large_side
                image = photo(rng, height, width)
                data = (
                    encode_jpeg(image, quality)
                    if kind is None
                    else encode_odd(kind, image, quality)
                )
                # A file object: tfds stores the bytes as they are, without TensorFlow.
                yield (
                    i,
                    {
                        "image": io.BytesIO(data),
                        "label": i % NUM_CLASSES,
                        "file_name": f"{split}_{i:08d}.JPEG",
                    },
                )

    builder = Imagenet2012(data_dir=str(data_dir), file_format="array_record")
    if not builder.is_prepared():
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(try_download_gcs=False)
        )
    return Path(builder.data_dir)
