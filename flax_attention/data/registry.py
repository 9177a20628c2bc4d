"""Registry of supported datasets: name -> how to find, prepare and preprocess it."""

import dataclasses
from collections.abc import Callable
from pathlib import Path

from flax_attention.data import preprocess
from flax_attention.data.embedded import NAME as DIGITS_TFDS_NAME
from flax_attention.data.embedded import build_digits

_TFDS_BUILD = (
    "On a machine with internet access run\n"
    "    pip install tensorflow-datasets tensorflow\n"
    "    tfds build {tfds_name} --data_dir {data_dir} --file_format array_record\n"
    "and copy {data_dir}/{tfds_name} over to this machine."
)
_IMAGENET_BUILD = (
    "ImageNet cannot be downloaded automatically. Get ILSVRC2012_img_train.tar and "
    "ILSVRC2012_img_val.tar from https://image-net.org (registration required), put them in "
    "{data_dir}/downloads/manual, then run\n"
    "    pip install tensorflow-datasets tensorflow\n"
    "    tfds build imagenet2012 --data_dir {data_dir} --manual_dir {data_dir}/downloads/manual "
    "--file_format array_record"
)


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """One image-classification dataset stored as a tfds array_record dataset.

    Images are uint8 HWC in the store, as arrays or encoded (``encoded_images``: tfds ``Image``
    features, JPEG/PNG bytes); ``train_transform`` / ``eval_transform`` turn them into uint8
    (image_size, image_size, C) crops, normalised on the device with ``mean`` / ``std``.
    ``gpu_decodable``: JPEG images with ``imagenet_train`` augmentation, which
    ``gpu_decode.GpuJpegDecoder`` can decode and augment on the GPU. ``build`` writes the
    dataset into a data_dir with no download (embedded datasets only);
    otherwise ``prepare_hint`` says how a user prepares it (formatted with tfds_name, data_dir).
    """

    tfds_name: str
    image_size: int
    num_classes: int
    channels: int
    train_split: str
    eval_split: str
    train_transform: preprocess.TrainTransform
    eval_transform: preprocess.EvalTransform
    mean: tuple[float, ...]
    std: tuple[float, ...]
    encoded_images: bool = True
    gpu_decodable: bool = False
    prepare_hint: str = _TFDS_BUILD
    build: Callable[[Path], None] | None = None


DATASETS: dict[str, DatasetSpec] = {
    "digits": DatasetSpec(
        tfds_name=DIGITS_TFDS_NAME,
        image_size=16,
        num_classes=10,
        channels=1,
        train_split="train",
        eval_split="test",
        train_transform=preprocess.digits_train,
        eval_transform=preprocess.resize_square,
        mean=(0.3054,),
        std=(0.3760,),
        encoded_images=False,
        build=build_digits,
    ),
    "cifar10": DatasetSpec(
        tfds_name="cifar10",
        image_size=32,
        num_classes=10,
        channels=3,
        train_split="train",
        eval_split="test",
        train_transform=preprocess.cifar_train,
        eval_transform=preprocess.resize_square,
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2470, 0.2435, 0.2616),
    ),
    "cifar100": DatasetSpec(
        tfds_name="cifar100",
        image_size=32,
        num_classes=100,
        channels=3,
        train_split="train",
        eval_split="test",
        train_transform=preprocess.cifar_train,
        eval_transform=preprocess.resize_square,
        mean=(0.5071, 0.4865, 0.4409),
        std=(0.2673, 0.2564, 0.2762),
    ),
    "imagenet2012": DatasetSpec(
        tfds_name="imagenet2012",
        image_size=224,
        num_classes=1000,
        channels=3,
        train_split="train",
        eval_split="validation",
        train_transform=preprocess.imagenet_train,
        eval_transform=preprocess.imagenet_eval,
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
        gpu_decodable=True,
        prepare_hint=_IMAGENET_BUILD,
    ),
}


def get_spec(name: str) -> DatasetSpec:
    """The spec registered under ``name``; ``ValueError`` listing the known names otherwise (as
    ``models.get_spec``)."""
    try:
        return DATASETS[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; known: {sorted(DATASETS)}") from None
