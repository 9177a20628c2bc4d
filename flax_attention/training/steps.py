"""Pure train/eval step functions and the parallel forms that compile and feed them.

A step is a pure function of (TrainState, batch) closed over the static graphdef and optimizer;
each form compiles it once (`jax.jit` or `jax.pmap`), never `nnx.jit` per step. Batches are
{"image": uint8 (B, H, W, C) NHWC, "label": int32 (B,)}, B the global batch, normalised in the
step with the dataset's `mean`/`std` (float images pass through as they are); a process passes
its local rows (B / process_count) and the form assembles the global array.

Forms, same numerics (the mean over the global batch; BatchNorm statistics over the global batch):
- `jit`: `jax.jit` over a Mesh with a `data` axis over all devices; state replicated, batch
  sharded on `data`; XLA's SPMD partitioner makes the BatchNorm statistics global.
- `pmap`: `jax.pmap` with `axis_name="data"`; gradients, metrics and BatchNorm statistics
  averaged with `lax.pmean`; state replicated on the leading axis of every array.
- `none`: `jax.jit` on one device.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from flax_attention.data.device import normalize_images
from flax_attention.training.loss import cross_entropy, top_k_correct
from flax_attention.training.state import TrainState, merge_model, set_batchnorm_axis_name

Batch = dict[str, Any]
Metrics = dict[str, jax.Array]
AXIS = "data"


def train_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    state: TrainState,
    batch: Batch,
    *,
    label_smoothing: float = 0.0,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    axis_name: str | None = None,
) -> tuple[TrainState, Metrics]:
    """One optimizer update on `batch`; metrics are the batch means of loss, top1, top5.

    uint8 images are normalised with the dataset's `mean`/`std` (per channel, on the 0..1
    scale; None keeps the 0..255 values). With `axis_name` (pmap) the batch is this
    replica's part, and gradients and metrics are averaged over the axis (BatchNorm averages
    its statistics itself).
    """
    images = normalize_images(batch["image"], mean, std)

    def loss_fn(params, batch_stats):
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
    if axis_name is not None:
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


class MeshForm:
    """`jax.jit` over a 1-D mesh (`data` axis) of `devices`: state replicated, batch sharded.

    The canonical state (what checkpoints hold) is this form's replicated state.
    """

    def __init__(self, devices: list[jax.Device]):
        self.mesh = Mesh(np.asarray(devices), (AXIS,))
        self.replicated = NamedSharding(self.mesh, P())
        self.sharded = NamedSharding(self.mesh, P(AXIS))
        self.num_devices = len(devices)

    def prepare_model(self, model: nnx.Module) -> None:
        """Nothing: under SPMD the BatchNorm statistics are global already."""

    def put_state(self, state: TrainState) -> TrainState:
        """The canonical state placed for this form's step."""
        return jax.device_put(state, self.replicated)

    def canonical_state(self, state: TrainState) -> TrainState:
        """This form's state as the canonical (mesh-replicated) state."""
        return state

    def put_batch(self, local_batch: dict[str, np.ndarray | jax.Array]) -> Batch:
        """Global batch sharded on `data` from this process's rows (B / process_count, ...),
        host arrays or (single process) device arrays."""
        return {k: self._put(v) for k, v in local_batch.items()}

    def _put(self, value: np.ndarray | jax.Array) -> jax.Array:
        if isinstance(value, jax.Array):  # Already on a device (GPU decoding, one process).
            return jax.device_put(value, self.sharded)
        return jax.make_array_from_process_local_data(self.sharded, np.asarray(value))

    def compile_train(self, step: Callable) -> Callable:
        return jax.jit(
            step,
            in_shardings=(self.replicated, self.sharded),
            out_shardings=(self.replicated, self.replicated),
            donate_argnums=0,
        )

    def compile_eval(self, step: Callable) -> Callable:
        """`step` compiled over the mesh, called as f(canonical state, local numpy batch)."""
        compiled = jax.jit(
            step, in_shardings=(self.replicated, self.sharded), out_shardings=self.replicated
        )
        return lambda state, local_batch: compiled(state, MeshForm.put_batch(self, local_batch))


class PmapForm(MeshForm):
    """`jax.pmap` over the local devices with `axis_name="data"` (all processes' devices form the
    axis). Arrays of the placed state carry a leading replica axis of size local_device_count.
    Evaluation runs in the mesh form on the canonical state."""

    def __init__(self, devices: list[jax.Device]):
        super().__init__(devices)
        self.local_devices = [d for d in devices if d.process_index == jax.process_index()]
        # A batch's rows over this process's devices, on the leading replica axis.
        self.replica_rows = NamedSharding(Mesh(self.local_devices, (AXIS,)), P(AXIS))

    def prepare_model(self, model: nnx.Module) -> None:
        """Cross-replica BatchNorm: every BatchNorm averages its statistics over `data`."""
        set_batchnorm_axis_name(model, AXIS)

    def put_state(self, state: TrainState) -> TrainState:
        n = len(self.local_devices)
        return jax.tree.map(lambda x: jnp.broadcast_to(np.asarray(x), (n, *x.shape)), state)

    def canonical_state(self, state: TrainState) -> TrainState:
        return jax.device_put(jax.tree.map(lambda x: np.asarray(x[0]), state), self.replicated)

    def put_batch(self, local_batch: dict[str, np.ndarray | jax.Array]) -> Batch:
        """This process's rows split over its devices on a leading replica axis, copied."""
        n = len(self.local_devices)
        return {
            k: jax.device_put(v.reshape(n, -1, *v.shape[1:]), self.replica_rows)
            for k, v in local_batch.items()
        }

    def compile_train(self, step: Callable) -> Callable:
        return jax.pmap(
            partial(step, axis_name=AXIS),
            axis_name=AXIS,
            devices=self.local_devices,
            donate_argnums=0,
        )


PARALLEL: dict[str, Callable[[], MeshForm]] = {
    "jit": lambda: MeshForm(jax.devices()),
    "pmap": lambda: PmapForm(jax.devices()),
    "none": lambda: MeshForm(jax.local_devices()[:1]),
}


def make_parallel(name: str) -> MeshForm:
    """The parallel form `name` (`jit`, `pmap` or `none`, see `PARALLEL`) over this host's JAX."""
    if name not in PARALLEL:
        raise ValueError(f"unknown parallel form {name!r}; choose one of {sorted(PARALLEL)}")
    return PARALLEL[name]()
