"""Pure train and eval step functions of a `TrainState` and a batch.

A step is a pure function of (TrainState, batch) closed over the static graphdef and optimizer;
the parallel forms (`flax_attention.training.parallel`) compile it once (`jax.jit` or
`jax.pmap`), never `nnx.jit` per step. Batches are {"image": uint8 (B, H, W, C) NHWC, "label":
int32 (B,)}, normalised in the step with the dataset's `mean`/`std` (float images pass through
as they are).

`grad_sync` (under a device axis): "flat" (the default) averages every gradient and metric after
the backward as one all-reduce of them concatenated into one float32 vector; "end" the same as
one `pmean` of the gradient tree (one all-reduce per leaf, which XLA combines into a few dozen);
"backward" averages each parameter's gradient as the backward produces it
(`grad_sync.mean_in_backward`), so those all-reduces can overlap the rest of it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.flatten_util import ravel_pytree

from flax_attention.data.device import normalize_images
from flax_attention.training.grad_sync import AxisName, mean_in_backward
from flax_attention.training.loss import cross_entropy, top_k_correct
from flax_attention.training.state import TrainState, merge_model

Batch = dict[str, Any]
Metrics = dict[str, jax.Array]
GRAD_SYNCS = ("flat", "end", "backward")


def train_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    state: TrainState,
    batch: Batch,
    *,
    label_smoothing: float = 0.0,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    axis_name: AxisName | None = None,
    grad_sync: str = "flat",
) -> tuple[TrainState, Metrics]:
    """One optimizer update on `batch`; metrics are the batch means of loss, top1, top5.

    uint8 images are normalised with the dataset's `mean`/`std` (per channel, on the 0..1
    scale; None keeps the 0..255 values). With `axis_name` (pmap, shard_map; a name or a
    tuple of names) the batch is this replica's part, and gradients and metrics are averaged
    over the axes (BatchNorm reduces its statistics itself): after the backward in one `pmean`
    of one concatenated vector (`grad_sync="flat"`) or of the tree (`"end"`), or each
    parameter's gradient as it is produced (`"backward"`).
    """
    images = normalize_images(batch["image"], mean, std)
    sync_in_backward = axis_name is not None and grad_sync == "backward"

    def loss_fn(params, batch_stats):
        if sync_in_backward:
            params = mean_in_backward(params, axis_name)
        model = merge_model(
            graphdef, state.replace(params=params, batch_stats=batch_stats), train=True
        )
        logits = model(images).astype(jnp.float32)
        loss = cross_entropy(logits, batch["label"], label_smoothing).mean()
        return loss, (logits, nnx.state(model, nnx.Not(nnx.Param)))

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (loss, (logits, batch_stats)), grads = grad_fn(state.params, state.batch_stats)
    metrics = {
        "loss": loss,
        "top1": top_k_correct(logits, batch["label"], 1).mean(),
        "top5": top_k_correct(logits, batch["label"], 5).mean(),
    }
    if sync_in_backward:
        metrics = jax.lax.pmean(metrics, axis_name)
    elif axis_name is not None and grad_sync == "flat":
        flat, unflatten = ravel_pytree((grads, metrics))
        grads, metrics = unflatten(jax.lax.pmean(flat, axis_name))
    elif axis_name is not None:
        grads, metrics = jax.lax.pmean((grads, metrics), axis_name)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    new_state = state.replace(
        params=optax.apply_updates(state.params, updates),
        batch_stats=batch_stats,
        opt_state=opt_state,
        step=state.step + 1,
    )
    return new_state, metrics


def eval_step(
    graphdef: nnx.GraphDef,
    state: TrainState,
    batch: Batch,
    *,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> Metrics:
    """Sums over the rows of `batch` where `batch["mask"]` (float (B,)) is 1: loss, top1, top5,
    count. Evaluation mode (BatchNorm running statistics); uint8 images normalised as in
    `train_step`."""
    model = merge_model(graphdef, state, train=False)
    logits = model(normalize_images(batch["image"], mean, std)).astype(jnp.float32)
    mask = batch["mask"]
    return {
        "loss": jnp.sum(cross_entropy(logits, batch["label"]) * mask),
        "top1": jnp.sum(top_k_correct(logits, batch["label"], 1) * mask),
        "top5": jnp.sum(top_k_correct(logits, batch["label"], 5) * mask),
        "count": jnp.sum(mask),
    }
