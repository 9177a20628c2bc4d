"""`flax-attention convert`: a PyTorch checkpoint checked, loaded into a registered model and
saved with orbax (nothing is written unless every check passes). `--overwrite` replaces only a
model checkpoint (`checkpoint.check_replaceable`), checked before any work."""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flax_attention import checkpoint
from flax_attention.cli.common import jitted_forward
from flax_attention.convert import (
    StateDictMismatchError,
    load_torch_checkpoint,
    load_torch_state_dict,
    to_torch_state_dict,
)
from flax_attention.convert.state_dict import clean_state_dict
from flax_attention.models import create_model, get_spec, resolve_weights

CHECK_INPUT_SHAPE = (1, 64, 64, 3)


def cmd_convert(args: argparse.Namespace) -> int:
    """Convert `args.src` to `args.outdir`; 1 if it does not fit the model or a check fails."""
    spec = get_spec(args.model)
    layout = args.layout or spec.layout
    _check_output(args)
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
    finite = bool(jnp.isfinite(jitted_forward(model)(x)).all())
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


def _check_output(args: argparse.Namespace) -> None:
    """Before any work: OUTDIR must be new, or (with --overwrite) a model checkpoint that
    `checkpoint.save` may replace; `FileExistsError` naming it otherwise."""
    out = Path(args.outdir)
    if out.is_dir() and not args.overwrite:
        raise FileExistsError(f"{args.outdir} already exists; pass --overwrite to replace it")
    local_source = [Path(args.src)] if Path(args.src).exists() else []
    checkpoint.check_replaceable(out, keep=local_source)


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
