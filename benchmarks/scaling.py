"""Data-parallel weak scaling: images/s per device of a training step on 1, 2 and 4 GPUs.

Runs the training library's own parallel forms (flax_attention.training.steps), so the numbers
are those of `python -m train --parallel jit|pmap`: `jit` = one `jax.jit` step over a mesh of the
first n devices (batch sharded on `data`, state replicated, global BatchNorm statistics), `pmap`
= `jax.pmap` with cross-replica BatchNorm and `pmean`-ed gradients; `pmap_local_bn` (ablation)
= `pmap` with per-replica BatchNorm statistics. Per-device batch 256, bf16
compute, SGD momentum, synthetic data already on the devices. Device counts above what the
machine has are listed under `not_run` in the JSON.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from benchmarks.common import Results, Settings, error_text, jax_sync, time_fn
from benchmarks.train import NUM_CLASSES, QUICK_BATCH, QUICK_IMAGE
from flax_attention.models import create_model
from flax_attention.training.state import create_train_state
from flax_attention.training.steps import MeshForm, PmapForm, train_step

DEVICE_COUNTS = (1, 2, 4)
MODELS = ("seresnet50",)
PER_DEVICE_BATCH = 256


class PmapLocalBatchNorm(PmapForm):
    """An ablation, not a training mode: `pmap` with each replica's own BatchNorm statistics,
    so the step's only collective is the gradient `pmean`. Its gap to `pmap` is what the
    cross-replica BatchNorm all-reduces cost."""

    def prepare_model(self, model: nnx.Module) -> None:
        pass


FORMS = {"jit": MeshForm, "pmap": PmapForm, "pmap_local_bn": PmapLocalBatchNorm}


def _batches(form: MeshForm, n_items: int, batch: int, image: int) -> list[tuple]:
    """Random (never zero) global batches placed as the form's step takes them."""
    out = []
    for key in jax.random.split(jax.random.key(0), n_items):
        x = jax.random.normal(key, (batch, image, image, 3), jnp.float32).astype(jnp.bfloat16)
        y = jax.random.randint(key, (batch,), 0, NUM_CLASSES)
        if isinstance(form, PmapForm):
            n = len(form.local_devices)
            placed = jax.pmap(lambda a, b: (a, b), devices=form.local_devices)(
                x.reshape(n, -1, *x.shape[1:]), y.reshape(n, -1)
            )
        else:
            placed = jax.device_put((x, y), form.sharded)
        out.append(({"image": placed[0], "label": placed[1]},))
    return out


def measure(name: str, form_name: str, n: int, settings: Settings, batch: int, image: int):
    """(compile seconds, Timing) of `name`'s training step in form `form_name` on n devices."""
    form = FORMS[form_name](jax.devices()[:n])
    model = create_model(name, num_classes=NUM_CLASSES, rngs=nnx.Rngs(0), dtype=jnp.bfloat16)
    form.prepare_model(model)
    graphdef, state = create_train_state(model, optax.sgd(0.1, momentum=0.9), seed=0)
    step = form.compile_train(
        lambda s, b, **kw: train_step(graphdef, optax.sgd(0.1, momentum=0.9), s, b, **kw)
    )
    data = _batches(form, settings.inputs, batch * n, image)
    box = [form.put_state(state)]
    t0 = time.perf_counter()
    box[0], metrics = step(box[0], *data[0])
    jax_sync(metrics)
    compile_s = time.perf_counter() - t0

    def run(batch_dict):
        box[0], metrics = step(box[0], batch_dict)
        return metrics["loss"]

    return compile_s, time_fn(run, data, jax_sync, settings)


def run(settings: Settings, counts: tuple[int, ...] = DEVICE_COUNTS) -> Results:
    """Measure each model in each form at each device count the machine has."""
    res = Results("scaling", settings)
    available = jax.device_count()
    res.meta["not_run"] = [n for n in counts if n > available]
    batch = QUICK_BATCH if settings.quick else PER_DEVICE_BATCH
    image = QUICK_IMAGE if settings.quick else 224
    for name in MODELS:
        for n in (n for n in counts if n <= available):
            for form_name in FORMS:
                row = {"name": name, "impl": form_name, "n_devices": n, "batch": batch}
                row.update(dtype="bfloat16 compute, float32 params", shape=[batch, image, image, 3])
                try:
                    compile_s, timing = measure(name, form_name, n, settings, batch, image)
                    row.update(timing.as_dict(), compile_s=round(compile_s, 2))
                    row["img_per_s"] = round(batch * n / timing.median_ms * 1e3, 1)
                    row["img_per_s_per_device"] = round(row["img_per_s"] / n, 1)
                except Exception as e:
                    row["error"] = error_text(e)
                res.add(row)
    return res
