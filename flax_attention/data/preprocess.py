"""Image preprocessing as pure numpy functions on single uint8 HWC images.

Augmentations draw from an explicit ``np.random.Generator``. The grain pipeline derives that
generator from ``(seed, global record index)``; the global index keeps growing across epochs, so
every epoch sees fresh but reproducible augmentations. ``TrainPreprocess`` and ``EvalPreprocess``
wrap a transform plus mean/std normalisation into the callables that grain's ``random_map`` and
``map`` expect; batching them stacks the float32 HWC images into NHWC.
"""

import dataclasses
import math
from collections.abc import Callable, Sequence

import numpy as np

# (image uint8 HWC, output size, rng) -> uint8 (size, size, C)
TrainTransform = Callable[[np.ndarray, int, np.random.Generator], np.ndarray]
# (image uint8 HWC, output size) -> uint8 (size, size, C)
EvalTransform = Callable[[np.ndarray, int], np.ndarray]

Box = tuple[float, float, float, float]


def resize(image: np.ndarray, height: int, width: int, box: Box | None = None) -> np.ndarray:
    """Bilinear resize of ``image`` (uint8 HWC) to (height, width, C).

    ``box`` = (left, top, right, bottom) in pixels selects the source region (default: all of it),
    so cropping and resizing happen in a single resampling step.
    """
    from PIL import Image  # Pillow is also what tfds uses to decode images without TensorFlow.

    channels = image.shape[-1]
    pil = Image.fromarray(image[..., 0] if channels == 1 else image)
    out = pil.resize((width, height), Image.Resampling.BILINEAR, box=box)
    return np.asarray(out).reshape(height, width, channels)


def resize_square(image: np.ndarray, size: int) -> np.ndarray:
    """Resize ``image`` (uint8 HWC) to (size, size, C); a no-op when it already has that shape."""
    if image.shape[:2] == (size, size):
        return image
    return resize(image, size, size)


def random_flip(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Mirror ``image`` (HWC) left-right with probability 1/2."""
    return image[:, ::-1] if rng.random() < 0.5 else image


def pad_random_crop(image: np.ndarray, pad: int, rng: np.random.Generator) -> np.ndarray:
    """Zero-pad ``image`` (HWC) by ``pad`` pixels on each side and crop back to its shape at a
    random offset: a random shift of up to ``pad`` pixels (CIFAR-style augmentation)."""
    height, width = image.shape[:2]
    padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)))
    top, left = rng.integers(0, 2 * pad + 1, size=2)
    return padded[top : top + height, left : left + width]


def random_resized_crop(
    image: np.ndarray,
    size: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    attempts: int = 10,
) -> np.ndarray:
    """Inception-style crop: a random region covering ``scale`` of the area with aspect ratio in
    ``ratio`` (log-uniform), resized to (size, size, C). Falls back to the largest central crop
    with a clamped ratio, as torchvision's ``RandomResizedCrop`` does."""
    height, width = image.shape[:2]
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(attempts):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return resize(image, size, size, box=(left, top, left + w, top + h))
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    top, left = (height - h) // 2, (width - w) // 2
    return resize(image, size, size, box=(left, top, left + w, top + h))


def center_crop(image: np.ndarray, size: int, crop_fraction: float = 0.875) -> np.ndarray:
    """Resize the shorter side of ``image`` (HWC) to ``round(size / crop_fraction)`` keeping the
    aspect ratio, then take the central (size, size, C) crop (standard ImageNet evaluation)."""
    height, width = image.shape[:2]
    short = round(size / crop_fraction)
    if height <= width:
        new_h, new_w = short, round(width * short / height)
    else:
        new_h, new_w = round(height * short / width), short
    resized = resize(image, new_h, new_w)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return resized[top : top + size, left : left + size]


def imagenet_train(image: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Random-resized crop (scale (0.08, 1), ratio (3/4, 4/3)) + horizontal flip."""
    return random_flip(random_resized_crop(image, size, rng), rng)


def imagenet_eval(image: np.ndarray, size: int) -> np.ndarray:
    """Resize the shorter side to size / 0.875, then center crop to (size, size)."""
    return center_crop(image, size)


def cifar_train(image: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Pad size/8 (4 at 32x32) + random crop + horizontal flip."""
    return random_flip(pad_random_crop(resize_square(image, size), size // 8, rng), rng)


def digits_train(image: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Upsample to (size, size) and shift by up to size/8 pixels; no flip (digits are not
    mirror-symmetric)."""
    return pad_random_crop(resize_square(image, size), size // 8, rng)


def normalize(image: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """uint8 HWC in [0, 255] -> float32 HWC ``(x / 255 - mean) / std`` (mean/std per channel)."""
    scaled = image.astype(np.float32) / 255.0
    return (scaled - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def _output(image: np.ndarray, label: int, mean: Sequence[float], std: Sequence[float]) -> dict:
    return {"image": normalize(image, mean, std), "label": np.int32(label)}


@dataclasses.dataclass(frozen=True)
class TrainPreprocess:
    """grain ``random_map`` callable: record {"image": uint8 HWC, "label": int} ->
    {"image": float32 (size, size, C) normalised, "label": int32}, augmented with ``rng``."""

    transform: TrainTransform
    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __call__(self, record: dict, rng: np.random.Generator) -> dict:
        image = self.transform(record["image"], self.size, rng)
        return _output(image, record["label"], self.mean, self.std)


@dataclasses.dataclass(frozen=True)
class EvalPreprocess:
    """grain ``map`` callable: record {"image": uint8 HWC, "label": int} ->
    {"image": float32 (size, size, C) normalised, "label": int32}, deterministic."""

    transform: EvalTransform
    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __call__(self, record: dict) -> dict:
        image = self.transform(record["image"], self.size)
        return _output(image, record["label"], self.mean, self.std)
