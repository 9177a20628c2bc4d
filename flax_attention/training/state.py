"""The train state: model variables, optimizer state and step as one pytree."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct


@struct.dataclass
class TrainState:
    """Everything a training step reads and writes.

    `params`: the model's `nnx.Param` variables (float32); `batch_stats`: every other variable
    (BatchNorm running statistics); `opt_state`: optax state over `params`; `step`: int32 scalar,
    the number of updates applied. It holds no PRNG key: the models have no dropout or other
    randomness in training (checkpoints written when it held one still restore, see
    `checkpointing`).
    """

    params: nnx.State
    batch_stats: nnx.State
    opt_state: optax.OptState
    step: jax.Array


def create_train_state(
    model: nnx.Module, tx: optax.GradientTransformation
) -> tuple[nnx.GraphDef, TrainState]:
    """Split `model` (put in training mode) into its static graph and a fresh `TrainState`."""
    model.train()
    graphdef, params, batch_stats = nnx.split(model, nnx.Param, ...)
    state = TrainState(
        params=params,
        batch_stats=batch_stats,
        opt_state=tx.init(params),
        step=jnp.zeros((), jnp.int32),
    )
    return graphdef, state


def merge_model(graphdef: nnx.GraphDef, state: TrainState, *, train: bool) -> nnx.Module:
    """A model (a fresh copy) holding `state`'s variables, in training or evaluation mode."""
    model = nnx.merge(graphdef, state.params, state.batch_stats, copy=True)
    model.train() if train else model.eval()
    return model


def set_batchnorm_axis_name(model: nnx.Module, axis_name: str | None) -> None:
    """Average BatchNorm batch statistics over the named (pmap) axis in every BatchNorm."""
    for _, node in nnx.iter_graph(model):
        if isinstance(node, nnx.BatchNorm):
            node.axis_name = axis_name
