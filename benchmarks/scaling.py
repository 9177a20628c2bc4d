"""Data-parallel weak scaling: images/s per device of a training step on 1, 2, 4 and 8 GPUs.

Runs the training library's own parallel forms (flax_attention.training.parallel) with their own
options, so the numbers are those of `python -m train --parallel jit|pmap`. Rows (`impl`):
- `jit`: one `jax.jit` of a `shard_map` step over a mesh of the first n devices (batch sharded,
  state replicated), global BatchNorm statistics in one collective per BatchNorm each way, the
  gradients averaged in one `pmean` after the backward (`--grad-sync end`);
- `jit_flat`: the same with the gradients averaged as one concatenated vector (`--grad-sync
  flat`, the training default);
- `jit_backward`: the same with each parameter's gradient averaged as the backward produces it
  (`--grad-sync backward`);
- `pmap`: `jax.pmap` with cross-replica BatchNorm, gradients averaged as `--grad-sync end`;
- `jit_bn_group`: `jit` with `--bn-group-size n/2` (1 on 2 devices: per-device statistics).
One device runs `jit` only: the base of every row's `efficiency` (images/s per device over the
one-device `jit` row's). Multi-device rows carry `collectives`: the all-reduce, all-gather,
reduce-scatter (...) ops in the compiled step's HLO. Per-device batch 256, bf16 compute, SGD
momentum, synthetic data already on the devices. Device counts above the machine's are listed
under `not_run`. `--quick`: a one-stage SE ResNet on 16x16 images, 2 per device (CPU smoke).
The lab's `python -m benchmarks.lab.scaling_ablations` adds ablation rows and kernel profiles.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from benchmarks.charts import ChartSpec, series
from benchmarks.results import Results, error_text
from benchmarks.settings import Settings
from benchmarks.timing import jax_sync, time_fn
from benchmarks.train import NUM_CLASSES
from flax_attention.models import BasicBlock, ResNet, create_model
from flax_attention.training.collectives import count_collectives
from flax_attention.training.parallel import MeshForm, PlacedState, PmapForm
from flax_attention.training.state import create_train_state
from flax_attention.training.steps import train_step

DEVICE_COUNTS = (1, 2, 4, 8)
MODELS = ("seresnet50",)
PER_DEVICE_BATCH, QUICK_BATCH = 256, 2
IMAGE, QUICK_IMAGE = 224, 16

CHART = ChartSpec(
    value="img_per_s_per_device",
    label="images / s per device",
    group=lambda r: f"{r['name']} x{r['n_devices']}",
    series=series,
)


@dataclass(frozen=True)
class Variant:
    """How a row's step is built: the training form `form(devices)`, which prepares the model
    and compiles the step unless `prepare_model(form, model)` or `compile_train(form, step)`
    replace that (the lab's ablations)."""

    form: Callable[[list[jax.Device]], MeshForm]
    prepare_model: Callable[[MeshForm, nnx.Module], None] | None = None
    compile_train: Callable[[MeshForm, Callable], Callable] | None = None

    def prepare(self, form: MeshForm, model: nnx.Module) -> None:
        """Set up `model`'s BatchNorms for `form`'s step."""
        (self.prepare_model or type(form).prepare_model)(form, model)

    def compile(self, form: MeshForm, step: Callable) -> Callable:
        """`step` compiled as `form` runs it, f(placed state, placed batch)."""
        return (self.compile_train or type(form).compile_train)(form, step)


# impl -> its variant over the given devices
VARIANTS: dict[str, Variant] = {
    "jit": Variant(lambda devices: MeshForm(devices, grad_sync="end")),
    "jit_flat": Variant(lambda devices: MeshForm(devices, grad_sync="flat")),
    "jit_backward": Variant(lambda devices: MeshForm(devices, grad_sync="backward")),
    "pmap": Variant(lambda devices: PmapForm(devices, grad_sync="end")),
    "jit_bn_group": Variant(
        lambda devices: MeshForm(
            devices, grad_sync="end", bn_group_size=bn_group_size(len(devices))
        )
    ),
}


def bn_group_size(n_devices: int) -> int:
    """The `jit_bn_group` row's BatchNorm group: half the devices (1 on 2: per-device)."""
    return max(1, n_devices // 2)


def impls_at(n_devices: int, variants: dict[str, Variant]) -> list[str]:
    """The rows measured on `n_devices` devices: `jit` alone on one (the efficiency base)."""
    return ["jit"] if n_devices == 1 else list(variants)


def build_model(name: str, quick: bool) -> nnx.Module:
    """`name` in bf16 compute, or (quick) a one-stage SE ResNet of BasicBlocks."""
    rngs = nnx.Rngs(0)
    if quick:
        return ResNet(
            BasicBlock, [1], num_classes=NUM_CLASSES, attention="se", rngs=rngs, dtype=jnp.bfloat16
        )
    return create_model(name, num_classes=NUM_CLASSES, rngs=rngs, dtype=jnp.bfloat16)


def _batches(form: MeshForm, n_items: int, batch: int, image: int) -> list[tuple]:
    """Random (never zero) global batches placed by the form as its step takes them."""
    out = []
    for key in jax.random.split(jax.random.key(0), n_items):
        x = jax.random.normal(key, (batch, image, image, 3), jnp.float32).astype(jnp.bfloat16)
        y = jax.random.randint(key, (batch,), 0, NUM_CLASSES)
        out.append((form.put_batch({"image": x, "label": y}),))
    return out


def compile_step(
    name: str, variant: Variant, n: int, settings: Settings, batch: int, image: int
) -> tuple[float, Callable, list[tuple], str]:
    """`name`'s training step built as `variant` on the first n devices, compiled and run once:
    (compile seconds, run(batch) -> loss, the placed batches, the compiled HLO text)."""
    form = variant.form(jax.devices()[:n])
    model = build_model(name, settings.quick)
    variant.prepare(form, model)
    tx = optax.sgd(0.1, momentum=0.9)
    graphdef, state = create_train_state(model, tx)
    step = variant.compile(form, lambda s, b, **kw: train_step(graphdef, tx, s, b, **kw))
    data = _batches(form, settings.inputs, batch * n, image)
    box: list[PlacedState] = [form.put_state(state)]
    t0 = time.perf_counter()
    compiled = step.lower(box[0], *data[0]).compile()
    box[0], metrics = compiled(box[0], *data[0])
    jax_sync(metrics)
    compile_s = time.perf_counter() - t0

    def run(batch_dict):
        box[0], metrics = compiled(box[0], batch_dict)
        return metrics["loss"]

    return compile_s, run, data, compiled.as_text()


def run(
    settings: Settings,
    counts: tuple[int, ...] = DEVICE_COUNTS,
    variants: dict[str, Variant] = VARIANTS,
) -> Results:
    """Measure each model as each of `variants` at each device count the machine has."""
    res = Results("scaling", settings)
    available = jax.device_count()
    res.meta["not_run"] = [n for n in counts if n > available]
    batch = QUICK_BATCH if settings.quick else PER_DEVICE_BATCH
    image = QUICK_IMAGE if settings.quick else IMAGE
    for name in MODELS:
        base = None  # the one-device jit row's images/s
        for n in (n for n in counts if n <= available):
            for impl in impls_at(n, variants):
                row = {"name": name, "impl": impl, "n_devices": n, "batch": batch}
                row.update(dtype="bfloat16 compute, float32 params", shape=[batch, image, image, 3])
                if impl == "jit_bn_group":
                    row["bn_group_size"] = bn_group_size(n)
                try:
                    compile_s, step, data, hlo_text = compile_step(
                        name, variants[impl], n, settings, batch, image
                    )
                    timing = time_fn(step, data, jax_sync, settings)
                    row.update(timing.as_dict(), compile_s=round(compile_s, 2))
                    row["img_per_s"] = round(batch * n / timing.median_ms * 1e3, 1)
                    row["img_per_s_per_device"] = round(row["img_per_s"] / n, 1)
                    if n == 1 and impl == "jit":
                        base = row["img_per_s_per_device"]
                    if base:
                        row["efficiency"] = round(row["img_per_s_per_device"] / base, 4)
                    if n > 1:
                        row["collectives"] = count_collectives(hlo_text)
                except Exception as e:
                    row["error"] = error_text(e)
                res.add(row)
    return res
