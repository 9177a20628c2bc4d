"""The `flax-attention` command: convert PyTorch checkpoints, list the registered models.

flax-attention convert SRC.pth OUTDIR --model NAME [--layout official|timm]
                       [--num-classes N] [--no-strict] [--overwrite]
flax-attention list [SUBSTRING]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flax_attention import checkpoint
from flax_attention.convert import (
    LAYOUTS,
    StateDictMismatchError,
    load_torch_checkpoint,
    load_torch_state_dict,
    to_torch_state_dict,
)
from flax_attention.models import MODELS, create_model, get_spec, list_models, pretrained_weights

CHECK_INPUT_SHAPE = (1, 64, 64, 3)


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
    state_dict = load_torch_checkpoint(args.src)
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
        print(f"error: {args.src} does not fit {args.model}: {err}", file=sys.stderr)
        return 1
    if report.missing:
        model = build()
        report = load(model)
    model.eval()

    exported = to_torch_state_dict(model, layout=layout)
    round_trip = all(
        np.array_equal(exported[k], np.asarray(state_dict[k], exported[k].dtype))
        for k in report.loaded
    )
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
    x = jax.random.normal(jax.random.key(0), CHECK_INPUT_SHAPE, jnp.float32)
    finite = bool(jnp.isfinite(forward(state, x)).all())
    params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))

    out = checkpoint.save(
        model,
        args.outdir,
        name=args.model,
        constructor_args={"num_classes": num_classes},
        layout=layout,
        source_file=args.src,
        overwrite=args.overwrite,
    )
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
    print(f"saved        {out}")
    return 0 if round_trip and finite else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flax-attention", description="Flax NNX attention ResNets: conversion and listing."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    convert = sub.add_parser(
        "convert",
        help="convert a PyTorch checkpoint to an orbax checkpoint",
        description="Load a PyTorch state_dict into a registered model and save it with orbax.",
    )
    convert.add_argument("src", help="PyTorch checkpoint (.pth, .pth.tar, .safetensors, .npz)")
    convert.add_argument("outdir", help="output checkpoint directory (must not exist)")
    convert.add_argument("--model", required=True, help="registered model name (see `list`)")
    convert.add_argument(
        "--layout", choices=LAYOUTS, help="key-name layout (default: the model's source)"
    )
    convert.add_argument(
        "--num-classes", type=int, help="classifier width (default: from fc.weight, else 1000)"
    )
    convert.add_argument(
        "--no-strict", action="store_true", help="load the matching keys, report the rest"
    )
    convert.add_argument("--overwrite", action="store_true", help="replace an existing OUTDIR")
    convert.set_defaults(run=cmd_convert)

    listing = sub.add_parser("list", help="list the registered models with parameter counts")
    listing.add_argument("pattern", nargs="?", default="", help="only names containing this")
    listing.set_defaults(run=cmd_list)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `flax-attention` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
