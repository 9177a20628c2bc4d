"""The parallel forms: how a step function is compiled over the devices and fed.

A process passes its local rows (B / process_count) of the global batch B and the form assembles
the global array. Forms, same numerics (the mean over the global batch; BatchNorm statistics
over the global batch):
- `jit`: `jax.jit` of a `jax.shard_map` step over a mesh of all devices; state replicated, batch
  sharded; inside, each device runs the step on its rows, BatchNorm reduces its statistics over
  the mesh axis `data` (one collective per BatchNorm each way) and gradients and metrics are
  averaged with `lax.pmean`. With `bn_group_size=g` the mesh is (`replica`, `data`) of shape
  (n / g, g): BatchNorm statistics over each group of g consecutive devices, gradients over all.
- `pmap`: `jax.pmap` with `axis_name="data"`; gradients, metrics and BatchNorm statistics
  averaged over the axis; state replicated on the leading axis of every array.
- `none`: the `jit` form on one device.

`grad_sync` (both multi-device forms) is one of `steps.GRAD_SYNCS`, passed to the step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from flax_attention.errors import ConfigError
from flax_attention.training.state import TrainState, set_batchnorm_axis_name
from flax_attention.training.steps import GRAD_SYNCS, Batch, Metrics

AXIS = "data"  # the BatchNorm axis (a group of devices); the batch is split over it
REPLICA = "replica"  # the BatchNorm groups (size 1 unless bn_group_size is given)


@jax.tree_util.register_pytree_node_class
class PlacedState:
    """A `TrainState` as the forms' compiled steps take and return it: its leaves (the arrays,
    in `jax.tree.leaves` order) under one pytree node that keeps the tree structure.

    A step call then flattens and rebuilds the state in one Python call; the `TrainState`
    itself would cost one per `nnx.Variable` each way (over a thousand for a ResNet-50's
    parameters, statistics and momentum), all on the thread that dispatches the steps."""

    def __init__(self, leaves: Sequence[Any], tree: jax.tree_util.PyTreeDef):
        self.leaves, self.tree = tuple(leaves), tree

    @classmethod
    def of(cls, state: TrainState) -> PlacedState:
        leaves, tree = jax.tree.flatten(state)
        return cls(leaves, tree)

    def state(self) -> TrainState:
        """The `TrainState` these leaves make."""
        return jax.tree.unflatten(self.tree, self.leaves)

    def tree_flatten(self) -> tuple[tuple[Any, ...], jax.tree_util.PyTreeDef]:
        return self.leaves, self.tree

    @classmethod
    def tree_unflatten(cls, tree: jax.tree_util.PyTreeDef, leaves: Sequence[Any]) -> PlacedState:
        return cls(leaves, tree)


def on_placed_state(step: Callable) -> Callable:
    """`step(state, batch, **kw) -> (state, metrics)` taking and returning `PlacedState`s."""

    def placed_step(placed: PlacedState, batch: Batch, **kw: Any) -> tuple[PlacedState, Metrics]:
        state, metrics = step(placed.state(), batch, **kw)
        return PlacedState.of(state), metrics

    return placed_step


class MeshForm:
    """`jax.jit` of a `jax.shard_map` step over a mesh of `devices`: state replicated, batch
    sharded over all devices, BatchNorm statistics over the mesh axis `data`.

    The mesh is (`replica`, `data`) of shape (n / g, g), g = `bn_group_size` (0: all n devices;
    it must divide n). With g < n each BatchNorm normalises with the statistics of its group's
    g * B / n rows, and the running statistics (which must stay identical on every device) are
    the average over the groups of each group's update; the gradients are averaged over all.
    `grad_sync`: "flat", "end" or "backward" (see `flax_attention.training.steps`). The canonical
    state (what checkpoints hold) is this form's replicated state.
    """

    def __init__(
        self, devices: list[jax.Device], *, grad_sync: str = "flat", bn_group_size: int = 0
    ):
        n = len(devices)
        if grad_sync not in GRAD_SYNCS:
            raise ConfigError(f"grad_sync: unknown value {grad_sync!r}; choose one of {GRAD_SYNCS}")
        group = bn_group_size or n
        if bn_group_size < 0 or n % group:
            raise ConfigError(
                f"bn_group_size must divide the number of devices, {n} (got {bn_group_size})"
            )
        self.mesh = Mesh(np.asarray(devices).reshape(n // group, group), (REPLICA, AXIS))
        self.replicated = NamedSharding(self.mesh, P())
        self.sharded = NamedSharding(self.mesh, P((REPLICA, AXIS)))
        self.num_devices = n
        self.grad_sync = grad_sync
        # One device: nothing to average; "flat" would only copy the gradients in and out.
        self.step_grad_sync = "end" if n == 1 else grad_sync
        self.bn_group_size = group
        self.bn_groups = n // group

    def prepare_model(self, model: nnx.Module) -> None:
        """Every BatchNorm reduces its statistics over `data` (its group of devices), or keeps
        its device's own for groups of one device."""
        set_batchnorm_axis_name(model, AXIS if self.bn_group_size > 1 else None)

    def put_state(self, state: TrainState) -> PlacedState:
        """The canonical state placed for this form's step."""
        return PlacedState.of(jax.device_put(state, self.replicated))

    def canonical_state(self, placed: PlacedState) -> TrainState:
        """This form's placed state as the canonical (mesh-replicated) state."""
        return placed.state()

    def put_batch(self, local_batch: dict[str, np.ndarray | jax.Array]) -> Batch:
        """Global batch sharded over all devices from this process's rows (B / process_count, ...),
        host arrays or (single process) device arrays."""
        return {k: self._put(v) for k, v in local_batch.items()}

    def _put(self, value: np.ndarray | jax.Array) -> jax.Array:
        if isinstance(value, jax.Array):  # Already on a device (GPU decoding, one process).
            return jax.device_put(value, self.sharded)
        return jax.make_array_from_process_local_data(self.sharded, np.asarray(value))

    def compile_train(self, step: Callable) -> Callable:
        """`step(state, batch, axis_name=..., grad_sync=...)` run per device under shard_map,
        called as f(placed state, placed batch) -> (placed state, metrics)."""

        @on_placed_state
        def per_device(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
            state, metrics = step(
                state, batch, axis_name=(REPLICA, AXIS), grad_sync=self.step_grad_sync
            )
            if self.bn_groups > 1:  # the groups' running statistics differ: keep their mean
                state = state.replace(batch_stats=jax.lax.pmean(state.batch_stats, REPLICA))
            return state, metrics

        mapped = jax.shard_map(
            per_device,
            mesh=self.mesh,
            in_specs=(P(), P((REPLICA, AXIS))),
            out_specs=(P(), P()),
            check_vma=False,  # the explicit collectives make gradients and state replicated
        )
        return jax.jit(
            mapped,
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
    Evaluation runs in the mesh form on the canonical state. BatchNorm groups are not
    supported (`bn_group_size` must be 0)."""

    def __init__(
        self, devices: list[jax.Device], *, grad_sync: str = "flat", bn_group_size: int = 0
    ):
        if bn_group_size:
            raise ConfigError("bn_group_size needs parallel 'jit' (pmap: 0, all devices)")
        super().__init__(devices, grad_sync=grad_sync)
        self.local_devices = [d for d in devices if d.process_index == jax.process_index()]
        # A batch's rows over this process's devices, on the leading replica axis.
        self.replica_rows = NamedSharding(Mesh(self.local_devices, (AXIS,)), P(AXIS))

    def put_state(self, state: TrainState) -> PlacedState:
        n = len(self.local_devices)
        broadcast = jax.tree.map(lambda x: jnp.broadcast_to(np.asarray(x), (n, *x.shape)), state)
        return PlacedState.of(broadcast)

    def canonical_state(self, placed: PlacedState) -> TrainState:
        first = jax.tree.map(lambda x: np.asarray(x[0]), placed.state())
        return jax.device_put(first, self.replicated)

    def put_batch(self, local_batch: dict[str, np.ndarray | jax.Array]) -> Batch:
        """This process's rows split over its devices on a leading replica axis, copied."""
        n = len(self.local_devices)
        return {
            k: jax.device_put(v.reshape(n, -1, *v.shape[1:]), self.replica_rows)
            for k, v in local_batch.items()
        }

    def compile_train(self, step: Callable) -> Callable:
        return jax.pmap(
            partial(on_placed_state(step), axis_name=AXIS, grad_sync=self.step_grad_sync),
            axis_name=AXIS,
            devices=self.local_devices,
            donate_argnums=0,
        )


PARALLEL: dict[str, Callable[..., MeshForm]] = {
    "jit": lambda **options: MeshForm(jax.devices(), **options),
    "pmap": lambda **options: PmapForm(jax.devices(), **options),
    "none": lambda **options: MeshForm(jax.local_devices()[:1], **options),
}


def make_parallel(name: str, *, grad_sync: str = "flat", bn_group_size: int = 0) -> MeshForm:
    """The parallel form `name` (`jit`, `pmap` or `none`, see `PARALLEL`) over this host's JAX,
    with the given gradient synchronisation and BatchNorm group size (see `MeshForm`);
    `ConfigError` for a combination the form cannot run."""
    if name not in PARALLEL:
        raise ValueError(f"unknown parallel form {name!r}; choose one of {sorted(PARALLEL)}")
    return PARALLEL[name](grad_sync=grad_sync, bn_group_size=bn_group_size)
