"""Data-parallel scaling: images/s per device of ResNet-50 training on 1, 2 and 4 GPUs.

Two ways of spreading the same step: `jit` with a NamedSharding (batch split over a "data" mesh
axis, parameters replicated; XLA inserts the gradient all-reduce and batch-statistics
reductions) and `pmap` (one replica per device, gradients `pmean`-ed, per-device BatchNorm
statistics). Per-device batch 256 (weak scaling). Device counts above what the machine has are
skipped and listed under `not_run` in the JSON.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from benchmarks.common import Results, Settings, error_text, jax_sync, time_fn
from benchmarks.train import NUM_CLASSES, QUICK_BATCH, QUICK_IMAGE, make_step
from flax_attention.models import create_model

DEVICE_COUNTS = (1, 2, 4)
MODEL = "resnet50"
PER_DEVICE_BATCH = 256


def _model():
    model = create_model(MODEL, num_classes=NUM_CLASSES, rngs=nnx.Rngs(0), dtype=jnp.bfloat16)
    model.train()
    return model


def _data(n_items: int, batch: int, image: int):
    keys = jax.random.split(jax.random.key(0), n_items)
    return [
        (
            jax.random.normal(k, (batch, image, image, 3), jnp.float32).astype(jnp.bfloat16),
            jax.random.randint(k, (batch,), 0, NUM_CLASSES),
        )
        for k in keys
    ]


def jit_sharded(n: int, settings: Settings, batch: int, image: int) -> tuple[float, object]:
    """Compile seconds and timing of the NamedSharding step on the first `n` devices."""
    mesh = Mesh(jax.devices()[:n], ("data",))
    replicated = NamedSharding(mesh, PartitionSpec())
    split = NamedSharding(mesh, PartitionSpec("data"))
    step, state = make_step(_model(), optax.sgd(0.1, momentum=0.9))
    state = jax.device_put(state, replicated)
    data = [jax.device_put(d, split) for d in _data(settings.inputs, batch * n, image)]
    t0 = time.perf_counter()
    compiled = step.lower(*state, *data[0]).compile()
    compile_s = time.perf_counter() - t0
    box = [state]

    def run(x, y):
        *s, loss = compiled(*box[0], x, y)
        box[0] = s
        return loss

    return compile_s, time_fn(run, data, jax_sync, settings)


def pmapped(n: int, settings: Settings, batch: int, image: int) -> tuple[float, object]:
    """Compile seconds and timing of the pmap step on the first `n` devices."""
    model = _model()
    tx = optax.sgd(0.1, momentum=0.9)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss_fn(params, rest, x, y):
        m = nnx.merge(graphdef, params, rest)
        loss = optax.softmax_cross_entropy_with_integer_labels(m(x).astype(jnp.float32), y)
        return loss.mean(), nnx.split(m, nnx.Param, ...)[2]

    def step(params, rest, opt_state, x, y):
        grad_fn = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)
        (loss, rest), (grads, _) = grad_fn(params, rest, x, y)
        grads = jax.lax.pmean(grads, "data")
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), rest, opt_state, jax.lax.pmean(loss, "data")

    devices = jax.devices()[:n]
    pstep = jax.pmap(step, axis_name="data", devices=devices, donate_argnums=(0, 1, 2))
    state = jax.tree.map(lambda a: jnp.stack([a] * n), (params, rest, tx.init(params)))
    data = [
        jax.tree.map(lambda a: a.reshape(n, batch, *a.shape[1:]), d)
        for d in _data(settings.inputs, batch * n, image)
    ]
    t0 = time.perf_counter()
    box = [pstep(*state, *data[0])[:3]]
    jax_sync(box[0])
    compile_s = time.perf_counter() - t0

    def run(x, y):
        *s, loss = pstep(*box[0], x, y)
        box[0] = s
        return loss

    return compile_s, time_fn(run, data, jax_sync, settings)


STRATEGIES = {"jit_namedsharding": jit_sharded, "pmap": pmapped}


def run(settings: Settings, counts: tuple[int, ...] = DEVICE_COUNTS) -> Results:
    """Measure each strategy at each device count the machine has."""
    res = Results("scaling", settings)
    available = jax.device_count()
    res.meta["not_run"] = [n for n in counts if n > available]
    res.meta["model"] = MODEL
    batch = QUICK_BATCH if settings.quick else PER_DEVICE_BATCH
    image = QUICK_IMAGE if settings.quick else 224
    for n in (n for n in counts if n <= available):
        for impl, fn in STRATEGIES.items():
            row = {"name": MODEL, "impl": impl, "n_devices": n, "batch": batch}
            row.update(dtype="bfloat16 compute, float32 params", shape=[batch, image, image, 3])
            try:
                compile_s, timing = fn(n, settings, batch, image)
                row.update(timing.as_dict(), compile_s=round(compile_s, 2))
                row["img_per_s"] = round(batch * n / timing.median_ms * 1e3, 1)
                row["img_per_s_per_device"] = round(row["img_per_s"] / n, 1)
            except Exception as e:
                row["error"] = error_text(e)
            res.add(row)
    return res
