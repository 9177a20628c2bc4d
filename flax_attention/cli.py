"""The `flax-attention` command: convert PyTorch checkpoints, evaluate and run saved models, list
the registered models.

flax-attention convert SRC.pth OUTDIR --model NAME [--layout official|timm] [--num-classes N]
                       [--key ENTRY] [--dataset NAME] [--no-strict] [--overwrite]
flax-attention eval MODEL_DIR [--dataset NAME] [--data-dir D] [--batch-size B] [--split S]
flax-attention predict MODEL_DIR IMAGE... [--dataset NAME]
flax-attention list [SUBSTRING]

Exit status: 0 success, 1 the data failed a check (checkpoint does not fit or is corrupt),
2 usage error (bad argument, missing file, existing output); errors are one `error: ...` line.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any, NoReturn

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flax_attention import checkpoint, data
from flax_attention.convert import (
    LAYOUTS,
    StateDictMismatchError,
    load_torch_checkpoint,
    load_torch_state_dict,
    to_torch_state_dict,
)
from flax_attention.convert.state_dict import clean_state_dict
from flax_attention.data import DatasetSpec
from flax_attention.models import (
    MODELS,
    create_model,
    get_spec,
    list_models,
    pretrained_weights,
    resolve_weights,
)

CHECK_INPUT_SHAPE = (1, 64, 64, 3)
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


class UsageError(Exception):
    """A command-line argument the command cannot use; exit status 2."""


def count_params(name: str) -> int:
    """Parameters (nnx.Param, not BatchNorm statistics) of model `name` with 1000 classes: the
    registry's recorded count, else counted on an abstract build (nothing allocated)."""
    recorded = get_spec(name).params
    if recorded is not None:
        return recorded
    model = nnx.eval_shape(lambda: create_model(name, rngs=nnx.Rngs(0)))
    return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))


def cmd_list(args: argparse.Namespace) -> int:
    names = [n for n in list_models() if args.pattern in n]
    print(f"{'model':<18} {'source':<14} {'layout':<9} {'params':>12}  pretrained (default)")
    for name in names:
        spec = MODELS[name]
        hub = pretrained_weights(name)
        default = hub[0].source if hub else "-"
        print(f"{name:<18} {spec.source:<14} {spec.layout:<9} {count_params(name):>12,}  {default}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    spec = get_spec(args.model)
    layout = args.layout or spec.layout
    if Path(args.outdir).exists() and not args.overwrite:
        raise FileExistsError(f"{args.outdir} already exists; pass --overwrite to replace it")
    source = resolve_weights(args.src)  # a local file, or hf-hub:ORG/REPO[/FILE] from the cache
    state_dict = load_torch_checkpoint(source, key=args.key)
    num_classes = args.num_classes
    if num_classes is None:
        num_classes = state_dict["fc.weight"].shape[0] if "fc.weight" in state_dict else 1000
    strict = not args.no_strict

    def build():
        return create_model(args.model, num_classes=num_classes, rngs=nnx.Rngs(0))

    def load(model):
        return load_torch_state_dict(model, state_dict, layout=layout, strict=strict)

    try:
        model = nnx.eval_shape(build)  # no random initialisation unless something is missing
        report = load(model)
    except StateDictMismatchError as err:
        _check_something_matches(args, layout, err.report.loaded, state_dict)
        print(f"error: {args.src} does not fit {args.model}: {err}", file=sys.stderr)
        return 1
    except ValueError as err:  # tensors that cannot be weights (not float, NaN/inf)
        raise ValueError(f"{args.src}: {err}") from None
    _check_something_matches(args, layout, report.loaded, state_dict)
    if report.missing:
        model = build()
        report = load(model)
    model.eval()

    given = clean_state_dict(state_dict)
    exported = to_torch_state_dict(model, layout=layout)
    round_trip = all(
        np.array_equal(exported[k], np.asarray(given[k], exported[k].dtype)) for k in report.loaded
    )
    x = jax.random.normal(jax.random.key(0), CHECK_INPUT_SHAPE, jnp.float32)
    finite = bool(jnp.isfinite(_jitted_forward(model)(x)).all())
    params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))

    print(f"model        {args.model} ({spec.source}), layout {layout}, {num_classes} classes")
    print(
        f"tensors      {len(report.loaded)} loaded, {len(report.missing)} missing, "
        f"{len(report.unexpected)} unexpected, {len(report.mismatched)} mis-shaped"
    )
    for key in report.missing + report.unexpected:
        print(f"  not loaded: {key}")
    print(f"parameters   {params:,}")
    print(f"round trip   to_torch_state_dict equals the input tensors: {round_trip}")
    print(f"forward      {CHECK_INPUT_SHAPE} NHWC logits finite: {finite}")
    if not (round_trip and finite):
        print(f"error: the checks above failed; nothing written to {args.outdir}", file=sys.stderr)
        return 1
    out = checkpoint.save(
        model,
        args.outdir,
        name=args.model,
        constructor_args={"num_classes": num_classes},
        layout=layout,
        source_file=source,
        dataset=args.dataset,
        overwrite=args.overwrite,
    )
    print(f"saved        {out} (restore: flax_attention.checkpoint.restore(None, DIR))")
    return 0


def _check_something_matches(
    args: argparse.Namespace, layout: str, loaded: list[str], state_dict: dict[str, np.ndarray]
) -> None:
    """ValueError naming the file's top-level key names if no tensor of it fits the model."""
    if loaded:
        return
    tops = Counter(key.split(".")[0] for key in clean_state_dict(state_dict))
    found = ", ".join(f"{name!r} ({n} tensors)" for name, n in tops.most_common(10))
    raise ValueError(
        f"no tensor of {args.src} matches {args.model} in the {layout!r} layout; its keys begin "
        f"with {found} (another model, another --layout, or weights under a prefix?)"
    )


def _jitted_forward(model: nnx.Module) -> Callable[[jax.Array], jax.Array]:
    """`model(x)` compiled once, for NHWC batches (the model in its current mode)."""
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
    return partial(forward, state)


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
        sums = jax.device_get(step(state, _padded(ds[i], args.batch_size)))
        totals.update({k: float(v) for k, v in sums.items()})
    count = totals.pop("count")
    print(
        f"{args.model_dir} on {name} {split} ({int(count)} images, {size}x{size}): "
        f"top-1 {totals['top1'] / count:.2%}, top-5 {totals['top5'] / count:.2%}, "
        f"loss {totals['loss'] / count:.4f}"
    )
    return 0


def _padded(batch: dict[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
    """`batch` padded with zero rows to `rows` (one compiled shape), plus its float32 "mask"."""
    n = len(batch["label"])
    out = {
        k: np.concatenate([v, np.zeros((rows - n, *v.shape[1:]), v.dtype)])
        for k, v in batch.items()
    }
    return {**out, "mask": (np.arange(rows) < n).astype(np.float32)}


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
    model, name, size = _restore_for(args)
    spec = data.get_spec(name)
    pixels = np.stack([load_image(path, spec, size) for path in args.images])
    images = data.normalize_images(jnp.asarray(pixels), spec.mean, spec.std)
    probs = np.asarray(jax.nn.softmax(_jitted_forward(model)(images), axis=-1))
    names = CLASS_NAMES.get(name, ())
    label = names.__getitem__ if len(names) == probs.shape[-1] else str
    for path, p in zip(args.images, probs, strict=True):
        top = np.argsort(-p, kind="stable")[:TOP_K]
        print(f"{path}: " + ", ".join(f"{label(int(c))} {p[c]:.2%}" for c in top))
    return 0


class _Parser(argparse.ArgumentParser):
    """Usage errors as one `error: ...` line on stderr, exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def _registered(registry: dict[str, Any], what: str) -> Callable[[str], str]:
    def check(name: str) -> str:
        if name not in registry:
            raise argparse.ArgumentTypeError(
                f"unknown {what} {name!r}; known: {', '.join(sorted(registry))}"
            )
        return name

    return check


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="flax-attention",
        description="Flax NNX attention ResNets: conversion, evaluation, prediction, listing.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    model_name = _registered(MODELS, "model")
    dataset_name = _registered(data.DATASETS, "dataset")

    convert = sub.add_parser(
        "convert",
        help="convert a PyTorch checkpoint to an orbax checkpoint",
        description="Load a PyTorch state_dict into a registered model and save it with orbax "
        "(nothing is written unless every check passes).",
    )
    convert.add_argument(
        "src",
        metavar="SRC",
        help="PyTorch checkpoint (.pth, .pth.tar, .safetensors, .npz) or hf-hub:ORG/REPO[/FILE]",
    )
    convert.add_argument(
        "outdir", metavar="OUTDIR", help="output checkpoint directory (must not exist)"
    )
    convert.add_argument(
        "--model",
        metavar="NAME",
        required=True,
        type=model_name,
        help="registered model name (see `list`)",
    )
    convert.add_argument(
        "--layout", choices=LAYOUTS, help="key-name layout (default: the model's source)"
    )
    convert.add_argument(
        "--num-classes",
        metavar="N",
        type=_positive,
        help="classifier width (default: from fc.weight, else 1000)",
    )
    convert.add_argument(
        "--key",
        metavar="ENTRY",
        help="entry of the file holding the weights, e.g. state_dict_ema (default: unwrap "
        "state_dict/model/net/module)",
    )
    convert.add_argument(
        "--dataset",
        metavar="NAME",
        type=dataset_name,
        help="record the dataset whose preprocessing the weights expect (for `predict`)",
    )
    convert.add_argument(
        "--no-strict", action="store_true", help="load the matching keys, report the rest"
    )
    convert.add_argument("--overwrite", action="store_true", help="replace an existing OUTDIR")
    convert.set_defaults(run=cmd_convert)

    evaluate = sub.add_parser(
        "eval",
        help="top-1/top-5/loss of a saved model over a dataset split",
        description="Evaluate a saved model (eval mode) over a split, with the dataset's "
        "evaluation preprocessing.",
    )
    evaluate.add_argument(
        "model_dir", metavar="MODEL_DIR", help="model checkpoint directory (training's model/)"
    )
    evaluate.add_argument(
        "--dataset",
        metavar="NAME",
        type=dataset_name,
        help="dataset (default: the one recorded in MODEL_DIR)",
    )
    evaluate.add_argument(
        "--data-dir", metavar="DIR", help="tfds data_dir holding the prepared dataset"
    )
    evaluate.add_argument(
        "--batch-size", metavar="B", type=_positive, default=256, help="default: 256"
    )
    evaluate.add_argument(
        "--split", metavar="SPLIT", help="tfds split (default: the dataset's evaluation split)"
    )
    evaluate.set_defaults(run=cmd_eval)

    predict = sub.add_parser(
        "predict",
        help="top-5 classes of image files",
        description="Print the top-5 classes of each image (class names for digits and "
        "cifar10, else indices), with the dataset's evaluation preprocessing.",
    )
    predict.add_argument("model_dir", metavar="MODEL_DIR", help="model checkpoint directory")
    predict.add_argument(
        "images", metavar="IMAGE", nargs="+", help="image files (any format Pillow reads)"
    )
    predict.add_argument(
        "--dataset",
        metavar="NAME",
        type=dataset_name,
        help="dataset (default: the one recorded in MODEL_DIR)",
    )
    predict.set_defaults(run=cmd_predict)

    listing = sub.add_parser("list", help="list the registered models with parameter counts")
    listing.add_argument("pattern", nargs="?", default="", help="only names containing this")
    listing.set_defaults(run=cmd_list)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `flax-attention` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (UsageError, FileNotFoundError, FileExistsError, NotADirectoryError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
