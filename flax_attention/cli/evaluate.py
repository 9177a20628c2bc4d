"""`flax-attention eval` and `predict`: a saved model over a dataset split, or on image files,
with the dataset's evaluation preprocessing."""

from __future__ import annotations

import argparse
from collections import Counter
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flax_attention import checkpoint, data
from flax_attention.cli.common import UsageError, jitted_forward
from flax_attention.data import DatasetSpec

TOP_K = 5
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


def _restore_for(args: argparse.Namespace) -> tuple[nnx.Module, str, int]:
    """The model of `args.model_dir` (eval mode), the dataset whose preprocessing it takes
    (`--dataset`, else the one recorded at save) and its input size."""
    metadata = checkpoint.read_metadata(args.model_dir)
    name = args.dataset or metadata["dataset"]
    if name is None:
        raise UsageError(
            f"{args.model_dir} records no dataset (converted weights?); pass --dataset NAME"
        )
    size = metadata["image_size"] if name == metadata["dataset"] else None
    return checkpoint.restore(None, args.model_dir), name, size or data.get_spec(name).image_size


def cmd_eval(args: argparse.Namespace) -> int:
    """Print top-1, top-5 and loss of the model in `args.model_dir` over a dataset split."""
    from flax_attention.training.evaluate import pad_batch
    from flax_attention.training.state import TrainState  # optax: not needed by the others
    from flax_attention.training.steps import eval_step

    model, name, size = _restore_for(args)
    spec = data.get_spec(name)
    if model.fc.out_features != spec.num_classes:
        raise UsageError(
            f"{args.model_dir} has {model.fc.out_features} classes, "
            f"dataset {name!r} {spec.num_classes}"
        )
    split = args.split or spec.eval_split
    try:
        ds = data.make_dataset(
            name,
            train=False,
            batch_size=args.batch_size,
            data_dir=args.data_dir,
            split=split,
            image_size=size,
        )
    except ValueError as err:  # tfds: an unknown split or a bad slice
        raise UsageError(f"--split {split!r}: {err}") from None
    graphdef, params, batch_stats = nnx.split(model, nnx.Param, ...)
    state = TrainState(params, batch_stats, None, jnp.zeros((), jnp.int32), jax.random.PRNGKey(0))
    step = jax.jit(partial(eval_step, graphdef, mean=spec.mean, std=spec.std))
    totals: Counter[str] = Counter()
    for i in range(len(ds)):
        sums = jax.device_get(step(state, pad_batch(ds[i], args.batch_size, ds[0])))
        totals.update({k: float(v) for k, v in sums.items()})
    count = totals.pop("count")
    print(
        f"{args.model_dir} on {name} {split} ({int(count)} images, {size}x{size}): "
        f"top-1 {totals['top1'] / count:.2%}, top-5 {totals['top5'] / count:.2%}, "
        f"loss {totals['loss'] / count:.4f}"
    )
    return 0


def load_image(path: str | Path, spec: DatasetSpec, size: int) -> np.ndarray:
    """Image file `path` as in the dataset's evaluation batches: uint8 (size, size,
    spec.channels) after its evaluation transform (normalise with `data.normalize_images`)."""
    from PIL import Image, UnidentifiedImageError

    if not Path(path).is_file():
        raise FileNotFoundError(f"no image file at {path}")
    try:
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("L" if spec.channels == 1 else "RGB"), np.uint8)
    except (UnidentifiedImageError, OSError) as err:
        raise UsageError(f"{path}: not an image Pillow can read ({err})") from None
    return spec.eval_transform(pixels.reshape(*pixels.shape[:2], spec.channels), size)


def cmd_predict(args: argparse.Namespace) -> int:
    """Print the top-5 classes of each image file of `args.images`."""
    model, name, size = _restore_for(args)
    spec = data.get_spec(name)
    pixels = np.stack([load_image(path, spec, size) for path in args.images])
    images = data.normalize_images(jnp.asarray(pixels), spec.mean, spec.std)
    probs = np.asarray(jax.nn.softmax(jitted_forward(model)(images), axis=-1))
    names = CLASS_NAMES.get(name, ())
    label = names.__getitem__ if len(names) == probs.shape[-1] else str
    for path, p in zip(args.images, probs, strict=True):
        top = np.argsort(-p, kind="stable")[:TOP_K]
        print(f"{path}: " + ", ".join(f"{label(int(c))} {p[c]:.2%}" for c in top))
    return 0
