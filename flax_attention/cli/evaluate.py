"""`flax-attention eval` and `predict`: a saved model over a dataset split (its JPEGs decoded on
the host or on the GPU, ``--decoder``), or on image files, with the dataset's evaluation
preprocessing. Memory stays bounded: the evaluation batch is at
most the split and what this machine holds, images are read in batches of ``PREDICT_BATCH``,
and an image past the pixel budget is refused before it is decoded."""

from __future__ import annotations

import argparse
import warnings
from collections import Counter
from collections.abc import Callable
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flax_attention import checkpoint, data
from flax_attention.cli.common import UsageError, jitted_forward
from flax_attention.data import DatasetSpec, limits

TOP_K = 5
PREDICT_BATCH = 32  # images read, preprocessed and run at once by `predict`
# Class names by dataset, in label order; other datasets print the class index.
CLASS_NAMES: dict[str, tuple[str, ...]] = {
    "digits": tuple("0123456789"),
    "cifar10": (
        "airplane",
        "automobile",
        "bird",
        "cat",
        "deer",
        "dog",
        "frog",
        "horse",
        "ship",
        "truck",
    ),
}


def _dataset_for(args: argparse.Namespace) -> tuple[dict, str]:
    """The metadata of `args.model_dir` and the dataset whose preprocessing the model takes
    (`--dataset`, else the one recorded at save)."""
    metadata = checkpoint.read_metadata(args.model_dir)
    name = args.dataset or metadata["dataset"]
    if name is None:
        raise UsageError(
            f"{args.model_dir} records no dataset (converted weights?); pass --dataset NAME"
        )
    return metadata, name


def _restore_for(args: argparse.Namespace, metadata: dict, name: str) -> tuple[nnx.Module, int]:
    """The model of `args.model_dir` (eval mode) and its input size for dataset `name`: the
    size recorded at save (`metadata`) when `name` is its dataset, else the dataset's."""
    size = metadata["image_size"] if name == metadata["dataset"] else None
    return checkpoint.restore(None, args.model_dir), size or data.get_spec(name).image_size


def _eval_decoder(args: argparse.Namespace, name: str) -> data.Decoder:
    """`--decoder` for dataset `name`, its process setup done before JAX first uses the GPU;
    `UsageError` when it cannot be used here."""
    data.prepare_decoding(args.decoder, name)
    try:
        return data.choose_decoder(args.decoder, name)
    except ValueError as err:
        raise UsageError(str(err)) from None


def cmd_eval(args: argparse.Namespace) -> int:
    """Print top-1, top-5 and loss of the model in `args.model_dir` over a dataset split."""
    from flax_attention.training.evaluate import eval_batch_finisher
    from flax_attention.training.state import TrainState  # optax: not needed by the others
    from flax_attention.training.steps import eval_step

    metadata, name = _dataset_for(args)
    decoder = _eval_decoder(args, name)
    model, size = _restore_for(args, metadata, name)
    spec = data.get_spec(name)
    if model.fc.out_features != spec.num_classes:
        raise UsageError(
            f"{args.model_dir} has {model.fc.out_features} classes, "
            f"dataset {name!r} {spec.num_classes}"
        )
    split = args.split or spec.eval_split
    try:
        split_size = len(data.data_source(name, split, args.data_dir))
    except ValueError as err:  # tfds: an unknown split or a bad slice
        raise UsageError(f"--split {split!r}: {err}") from None
    batch_size = _eval_batch(args.batch_size, split_size, size, spec.channels)
    ds = data.make_dataset(
        name,
        train=False,
        batch_size=batch_size,
        data_dir=args.data_dir,
        split=split,
        image_size=size,
        decoder=decoder,
    )
    finish = eval_batch_finisher(decoder, spec, size, batch_size)
    graphdef, params, batch_stats = nnx.split(model, nnx.Param, ...)
    state = TrainState(params, batch_stats, None, jnp.zeros((), jnp.int32))
    step = jax.jit(partial(eval_step, graphdef, mean=spec.mean, std=spec.std))
    totals: Counter[str] = Counter()
    for i in range(len(ds)):
        sums = jax.device_get(step(state, finish(ds[i])))
        totals.update({k: float(v) for k, v in sums.items()})
    count = totals.pop("count")
    print(
        f"{args.model_dir} on {name} {split} ({int(count)} images, {size}x{size}): "
        f"top-1 {totals['top1'] / count:.2%}, top-5 {totals['top5'] / count:.2%}, "
        f"loss {totals['loss'] / count:.4f}"
    )
    return 0


def _eval_batch(requested: int, split_size: int, side: int, channels: int) -> int:
    """`--batch-size` capped at the split's size (no padding past the data); `UsageError` when
    that batch does not fit this machine's memory."""
    batch = max(min(requested, split_size), 1)
    problem = limits.batch_problem(batch, side, channels)
    if problem:
        raise UsageError(f"--batch-size {requested}: {problem}")
    return batch


def load_image(path: str | Path, spec: DatasetSpec, size: int) -> np.ndarray:
    """Image file `path` as in the dataset's evaluation batches: uint8 (size, size,
    spec.channels) after its evaluation transform (normalise with `data.normalize_images`).
    An image of more than `limits.MAX_IMAGE_PIXELS` pixels is refused (`UsageError` naming
    `path`) before it is decoded."""
    from PIL import Image, UnidentifiedImageError

    if not Path(path).is_file():
        raise FileNotFoundError(f"no image file at {path}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # refused below
            with Image.open(path) as image:
                limits.check_image_pixels(image.height, image.width, str(path))
                pixels = np.asarray(image.convert("L" if spec.channels == 1 else "RGB"), np.uint8)
    except limits.ImageTooLargeError as err:
        raise UsageError(str(err)) from None
    except Image.DecompressionBombError as err:
        raise UsageError(f"{path}: {err}") from None
    except (UnidentifiedImageError, OSError) as err:
        raise UsageError(f"{path}: not an image Pillow can read ({err})") from None
    return spec.eval_transform(pixels.reshape(*pixels.shape[:2], spec.channels), size)


def cmd_predict(args: argparse.Namespace) -> int:
    """Print the top-5 classes of each image file of `args.images`, read and run in batches of
    at most `PREDICT_BATCH` images (the last one padded: one compiled shape)."""
    metadata, name = _dataset_for(args)
    model, size = _restore_for(args, metadata, name)
    spec = data.get_spec(name)
    forward = jitted_forward(model)
    label = _class_label(name, model.fc.out_features)
    batch = min(len(args.images), PREDICT_BATCH)
    for start in range(0, len(args.images), batch):
        paths = args.images[start : start + batch]
        pixels = np.zeros((batch, size, size, spec.channels), np.uint8)
        for row, path in enumerate(paths):
            pixels[row] = load_image(path, spec, size)
        images = data.normalize_images(jnp.asarray(pixels), spec.mean, spec.std)
        probs = np.asarray(jax.nn.softmax(forward(images), axis=-1))
        for path, p in zip(paths, probs, strict=False):
            top = np.argsort(-p, kind="stable")[:TOP_K]
            print(f"{path}: " + ", ".join(f"{label(int(c))} {p[c]:.2%}" for c in top))
    return 0


def _class_label(dataset: str, num_classes: int) -> Callable[[int], str]:
    """Class index -> what `predict` prints: the dataset's class name when it has one for every
    class, else the index."""
    names = CLASS_NAMES.get(dataset, ())
    return names.__getitem__ if len(names) == num_classes else str
