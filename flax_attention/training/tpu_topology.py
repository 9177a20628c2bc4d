"""The library's training step compiled ahead of time for a TPU slice this host does not have.

With `libtpu` installed, `jax.experimental.topologies.get_topology_desc` describes the chips of
a TPU slice (e.g. "v5e:4x4", 16 chips) on any host, a CPU one included, and `jax.jit(...)
.lower(<abstract arguments sharded over a Mesh of those chips>).compile()` compiles for them
without running anything. `compile_train_step` does that for the step `flax-attention train`
runs: `steps.train_step` in the `jit` parallel form (`parallel.MeshForm`: state replicated,
batch sharded over every chip, BatchNorm statistics over all chips or over groups of
`bn_group_size` chips), the ImageNet recipe's optimizer (SGD, Nesterov momentum, weight decay,
cosine schedule), uint8 NHWC images, 1000 classes.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.experimental import topologies
from jax.sharding import SingleDeviceSharding

from flax_attention.models import create_model
from flax_attention.training.config import PRECISIONS
from flax_attention.training.optim import make_optimizer, make_schedule
from flax_attention.training.parallel import MeshForm, PlacedState
from flax_attention.training.state import create_train_state
from flax_attention.training.steps import train_step

IMAGENET_CLASSES = 1000
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# Generations whose chips hold two TensorCores that JAX drives as one device ("megacore") on a
# real pod, where libtpu's topology description defaults to one device per core.
MEGACORE = ("v4",)


def topology_devices(topology: str) -> list[jax.Device]:
    """One compile-only device per chip of TPU slice `topology` ("v5e:2x2", "v4:4x4x4", ...),
    from libtpu's topology description (no TPU needed; v4 in megacore mode, as pods run it).
    Raises RuntimeError when libtpu is missing or does not know the topology.

    libtpu normally lets one process at a time load it (a lock file); compiling only, several
    processes may share it, so `ALLOW_MULTIPLE_LIBTPU_LOAD` is set unless already set."""
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    options = {"chip_config_name": "megacore"} if topology.split(":")[0] in MEGACORE else {}
    description = topologies.get_topology_desc(platform="tpu", topology_name=topology, **options)
    return list(description.devices)


@dataclass(frozen=True)
class StepShape:
    """What one compiled training step holds: `model` (a registered name), `per_chip_batch`
    images of `image_size` x `image_size` x 3 per chip, `precision` ("bf16" or "fp32", the
    compute dtype; parameters stay float32), `bn_group_size` (0: BatchNorm statistics over
    every chip, exact global BatchNorm; g: over groups of g chips) and `grad_sync` (see
    `flax_attention.training.steps`)."""

    model: str
    per_chip_batch: int
    image_size: int = 224
    precision: str = "bf16"
    bn_group_size: int = 0
    grad_sync: str = "flat"


def abstract_train_step(
    shape: StepShape, devices: list[jax.Device]
) -> tuple[Any, tuple[PlacedState, dict[str, jax.ShapeDtypeStruct]]]:
    """The `jit`-form training step over `devices` and its abstract arguments: (state, batch)
    as `jax.ShapeDtypeStruct`s carrying the form's shardings (state replicated; batch
    {"image": uint8 (B, H, W, 3), "label": int32 (B,)} with B = per_chip_batch * len(devices),
    sharded over the chips). The model is built abstractly: no initialiser runs."""
    form = MeshForm(devices, grad_sync=shape.grad_sync, bn_group_size=shape.bn_group_size)
    tx = make_optimizer(
        "sgd",
        make_schedule("cosine", lr=0.4, warmup_steps=5, total_steps=100),
        weight_decay=1e-4,
        momentum=0.9,
        nesterov=True,
    )

    def build() -> nnx.Module:
        dtype = PRECISIONS[shape.precision]
        return create_model(
            shape.model, num_classes=IMAGENET_CLASSES, rngs=nnx.Rngs(0), dtype=dtype
        )

    model = nnx.eval_shape(build)
    form.prepare_model(model)
    graphdef, state = create_train_state(model, tx)
    step = form.compile_train(
        partial(train_step, graphdef, tx, label_smoothing=0.1, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    )
    abstract_state = PlacedState.of(
        jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=form.replicated), state
        )
    )
    rows = shape.per_chip_batch * len(devices)
    side = shape.image_size
    batch = {
        "image": jax.ShapeDtypeStruct((rows, side, side, 3), jnp.uint8, sharding=form.sharded),
        "label": jax.ShapeDtypeStruct((rows,), jnp.int32, sharding=form.sharded),
    }
    return step, (abstract_state, batch)


def compile_for_chip(
    fn: Callable[..., Any], args: tuple[jax.ShapeDtypeStruct, ...], device: jax.Device
) -> jax.stages.Compiled:
    """`jax.jit(fn)` compiled for one chip `device` (e.g. `topology_devices(...)[0]`) with
    abstract `args` placed on it; a `pl.pallas_call` in `fn` lowers through Mosaic TPU."""
    on_chip = SingleDeviceSharding(device)
    placed = tuple(jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=on_chip) for a in args)
    return jax.jit(fn).lower(*placed).compile()


def compile_train_step(shape: StepShape, devices: list[jax.Device]) -> jax.stages.Compiled:
    """`abstract_train_step` lowered and compiled for `devices` (e.g. `topology_devices(...)`);
    nothing runs. Its `memory_analysis()` is per chip, `cost_analysis()` per chip per step."""
    step, args = abstract_train_step(shape, devices)
    return step.lower(*args).compile()
