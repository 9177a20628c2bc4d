"""`flax-attention list`: the registered models with their parameter counts."""

from __future__ import annotations

import argparse

import jax
import numpy as np
from flax import nnx

from flax_attention.models import MODELS, create_model, get_spec, list_models, pretrained_weights


def count_params(name: str) -> int:
    """Parameters (nnx.Param, not BatchNorm statistics) of model `name` with 1000 classes: the
    registry's recorded count, else counted on an abstract build (nothing allocated)."""
    recorded = get_spec(name).params
    if recorded is not None:
        return recorded
    model = nnx.eval_shape(lambda: create_model(name, rngs=nnx.Rngs(0)))
    return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))


def cmd_list(args: argparse.Namespace) -> int:
    """Print one row per registered model whose name contains `args.pattern`."""
    names = [n for n in list_models() if args.pattern in n]
    print(f"{'model':<18} {'source':<14} {'layout':<9} {'params':>12}  pretrained (default)")
    for name in names:
        spec = MODELS[name]
        hub = pretrained_weights(name)
        default = hub[0].source if hub else "-"
        print(f"{name:<18} {spec.source:<14} {spec.layout:<9} {count_params(name):>12,}  {default}")
    return 0
