"""The `flax-attention` command: train models, convert PyTorch checkpoints, evaluate and run saved
models, list the registered models.

flax-attention train [--config NAME|PATH] [flags]   (see `flax-attention train --help`)
flax-attention convert SRC.pth OUTDIR --model NAME [--layout official|timm] [--num-classes N]
                       [--key ENTRY] [--dataset NAME] [--no-strict] [--overwrite]
flax-attention eval MODEL_DIR [--dataset NAME] [--data-dir D] [--batch-size B] [--split S]
                    [--decoder auto|cpu|gpu]
flax-attention predict MODEL_DIR IMAGE... [--dataset NAME]
flax-attention list [SUBSTRING]

Exit status (`train`: see `flax_attention.cli.train.main`): 0 success, 1 the data failed a
check (checkpoint does not fit or is corrupt) or the disk is full, 2 usage error (bad argument, missing file, existing output, read-only
directory); errors are one `error: ...` line. Anything else is a bug: its traceback, then one
`error: ...` line, exit status 1.
"""

from __future__ import annotations

import argparse
import dis
import sys
from collections.abc import Callable, Sequence
from typing import Any

from flax_attention import data
from flax_attention.cli.common import Parser, UsageError
from flax_attention.cli.convert import cmd_convert
from flax_attention.cli.evaluate import cmd_eval, cmd_predict, load_image
from flax_attention.cli.listing import cmd_list
from flax_attention.cli.train import main as train_main
from flax_attention.convert import LAYOUTS
from flax_attention.errors import EXIT_FAILED, EXIT_USAGE, os_error_exit, report_bug
from flax_attention.models import MODELS

__all__ = ["UsageError", "build_parser", "load_image", "main"]

TRAIN = "train"  # the subcommand handed to the training program


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


def _add_recorded_dataset(parser: argparse.ArgumentParser, dataset_name: Callable) -> None:
    """`--dataset NAME` of eval and predict: the dataset, else the one recorded in MODEL_DIR."""
    parser.add_argument(
        "--dataset",
        metavar="NAME",
        type=dataset_name,
        help="dataset (default: the one recorded in MODEL_DIR)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="flax-attention",
        description="Flax NNX attention ResNets: training, conversion, evaluation, prediction, "
        "listing.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    model_name = _registered(MODELS, "model")
    dataset_name = _registered(data.DATASETS, "dataset")

    # Listed here for the help; `main` hands `train ...` to the training program's own parser
    # (its flags' defaults come from the config file that --config names).
    sub.add_parser(
        TRAIN,
        help="train a model (flags: flax-attention train --help)",
        add_help=False,
    )

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
    _add_recorded_dataset(evaluate, dataset_name)
    evaluate.add_argument(
        "--data-dir", metavar="DIR", help="tfds data_dir holding the prepared dataset"
    )
    evaluate.add_argument(
        "--batch-size", metavar="B", type=_positive, default=256, help="default: 256"
    )
    evaluate.add_argument(
        "--split", metavar="SPLIT", help="tfds split (default: the dataset's evaluation split)"
    )
    evaluate.add_argument(
        "--decoder",
        choices=("auto", "cpu", "gpu"),
        default="auto",
        help="where JPEGs are decoded: gpu (every local GPU its rows), cpu, or auto (the GPUs "
        "where they can, else the CPU); default: auto",
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
    _add_recorded_dataset(predict, dataset_name)
    predict.set_defaults(run=cmd_predict)

    listing = sub.add_parser("list", help="list the registered models with parameter counts")
    listing.add_argument("pattern", nargs="?", default="", help="only names containing this")
    listing.set_defaults(run=cmd_list)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `flax-attention` console script; returns the exit status.
    `train ...` runs the training program (`flax_attention.cli.train.main`) on the rest."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == [TRAIN]:
        return train_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except Exception as err:  # each kind gets its exit status in _report_failure
        return _report_failure(err)


# Modules whose own ValueErrors are checks of the user's files (a checkpoint or weights file
# that is unreadable, corrupt or does not fit the model), not bugs.
INPUT_CHECK_MODULES = frozenset(
    {
        "flax_attention.checkpoint",
        "flax_attention.checkpoint_metadata",
        "flax_attention.cli.convert",
        "flax_attention.cli.evaluate",
        "flax_attention.convert.files",
        "flax_attention.convert.state_dict",
        "flax_attention.models.pretrained",
    }
)


def _report_failure(err: Exception) -> int:
    """Print `err` as one `error:` line and return its exit status: 2 for a usage error or a
    missing/existing path, 1 for a file that failed a check or a full disk; anything else is
    a bug: its traceback, then one line, exit 1."""
    known = os_error_exit(err) if isinstance(err, OSError) else None
    if known is not None:
        status, message = known
        print(f"error: {message}", file=sys.stderr)
        return status
    if isinstance(err, UsageError | FileNotFoundError | FileExistsError | NotADirectoryError):
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    if isinstance(err, ValueError) and _raise_statement_module(err) in INPUT_CHECK_MODULES:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_FAILED
    return report_bug(err)


def _raise_statement_module(err: BaseException) -> str:
    """The name of the module whose `raise` statement raised `err`; "" if it came from
    elsewhere (e.g. out of a function written in C, such as a numpy shape error)."""
    tb = err.__traceback__
    if tb is None:
        return ""
    while tb.tb_next is not None:
        tb = tb.tb_next
    if tb.tb_frame.f_code.co_code[tb.tb_lasti] != dis.opmap["RAISE_VARARGS"]:
        return ""
    return tb.tb_frame.f_globals.get("__name__", "")
