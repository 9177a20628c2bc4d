"""Data-parallel weak scaling: images/s per device of a training step on 1, 2, 4 and 8 GPUs.

Runs the training library's own parallel forms (flax_attention.training.parallel), so the numbers
are those of `python -m train --parallel jit|pmap`. Rows (`impl`):
- `jit`: one `jax.jit` of a `shard_map` step over a mesh of the first n devices (batch sharded,
  state replicated), global BatchNorm statistics in one collective per BatchNorm each way, the
  gradients averaged in one `pmean` after the backward (`--grad-sync end`);
- `jit_flat`: the same with the gradients averaged as one concatenated vector (`--grad-sync
  flat`, the training default: 3.7% faster than `end` in the suite's 2-H200 run, 1.4-3.8% in
  two interleaved lab runs on another 2-H200 machine);
- `jit_backward`: the same with each parameter's gradient averaged as the backward produces it
  (`--grad-sync backward`);
- `pmap`: `jax.pmap` with cross-replica BatchNorm, gradients averaged as `--grad-sync end`;
- `jit_spmd` (ablation, the `jit` form before shard_map): `jax.jit` of the plain step over the
  mesh, XLA's SPMD partitioner making the BatchNorm statistics global;
- `pmap_local_bn` (ablation): `pmap` with each replica's own BatchNorm statistics;
- `jit_bn_group`: `jit` with `--bn-group-size n/2` (1 on 2 devices: per-device statistics).
One device runs `jit` only: the base of every row's `efficiency` (images/s per device over the
one-device `jit` row's). Multi-device rows carry `collectives`: the all-reduce, all-gather,
reduce-scatter (...) ops in the compiled step's HLO. Per-device batch 256, bf16 compute, SGD
momentum, synthetic data already on the devices. Device counts above the machine's are listed
under `not_run`. At the largest device count the `jit` and `pmap_local_bn` steps are also
traced, after their timing: `meta["profiles"]` holds each one's kernel time by category (summed
over the devices) and its costliest collectives, so the gap between exact and per-device
BatchNorm statistics can be read as collective time. `--quick`: a one-stage SE ResNet on 16x16
images, 2 per device (CPU smoke).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from benchmarks.common import Results, Settings, count_collectives, error_text, jax_sync, time_fn
from benchmarks.profiling import profile_calls
from benchmarks.train import NUM_CLASSES
from flax_attention.models import BasicBlock, ResNet, create_model
from flax_attention.training.parallel import MeshForm, PmapForm
from flax_attention.training.state import TrainState, create_train_state, set_batchnorm_axis_name
from flax_attention.training.steps import train_step

DEVICE_COUNTS = (1, 2, 4, 8)
MODELS = ("seresnet50",)
PER_DEVICE_BATCH, QUICK_BATCH = 256, 2
IMAGE, QUICK_IMAGE = 224, 16
PROFILED = ("jit", "pmap_local_bn")  # traced at the largest device count, after their timing
PROFILE_STEPS, PROFILE_TOP = 5, 12


class SpmdForm(MeshForm):
    """An ablation, the `jit` form before shard_map: `jax.jit` of the step with no axis names
    over the mesh; XLA's SPMD partitioner makes the BatchNorm statistics global (several
    small all-reduces per BatchNorm) and reduces the gradients."""

    def prepare_model(self, model: nnx.Module) -> None:
        set_batchnorm_axis_name(model, None)

    def compile_train(self, step: Callable) -> Callable:
        return jax.jit(
            step,
            in_shardings=(self.replicated, self.sharded),
            out_shardings=(self.replicated, self.replicated),
            donate_argnums=0,
        )


class PmapLocalBatchNorm(PmapForm):
    """An ablation, not a training mode: `pmap` with each replica's own BatchNorm statistics,
    so the step's only collective is the gradient `pmean`. Its gap to `pmap` is what the
    cross-replica BatchNorm collectives cost."""

    def prepare_model(self, model: nnx.Module) -> None:
        set_batchnorm_axis_name(model, None)


# impl -> form over the given devices
FORMS: dict[str, Callable[[list[jax.Device]], MeshForm]] = {
    "jit": lambda devices: MeshForm(devices, grad_sync="end"),
    "jit_flat": lambda devices: MeshForm(devices, grad_sync="flat"),
    "jit_backward": lambda devices: MeshForm(devices, grad_sync="backward"),
    "pmap": lambda devices: PmapForm(devices, grad_sync="end"),
    "jit_spmd": lambda devices: SpmdForm(devices),
    "pmap_local_bn": lambda devices: PmapLocalBatchNorm(devices, grad_sync="end"),
    "jit_bn_group": lambda devices: MeshForm(
        devices, grad_sync="end", bn_group_size=bn_group_size(len(devices))
    ),
}


def bn_group_size(n_devices: int) -> int:
    """The `jit_bn_group` row's BatchNorm group: half the devices (1 on 2: per-device)."""
    return max(1, n_devices // 2)


def forms_at(n_devices: int) -> list[str]:
    """The rows measured on `n_devices` devices: `jit` alone on one (the efficiency base)."""
    return ["jit"] if n_devices == 1 else list(FORMS)


def build_model(name: str, quick: bool) -> nnx.Module:
    """`name` in bf16 compute, or (quick) a one-stage SE ResNet of BasicBlocks."""
    rngs = nnx.Rngs(0)
    if quick:
        return ResNet(
            BasicBlock, [1], num_classes=NUM_CLASSES, attention="se", rngs=rngs, dtype=jnp.bfloat16
        )
    return create_model(name, num_classes=NUM_CLASSES, rngs=rngs, dtype=jnp.bfloat16)


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


def compile_step(
    name: str, impl: str, n: int, settings: Settings, batch: int, image: int
) -> tuple[float, Callable, list[tuple], str]:
    """`name`'s training step in form `impl` on the first n devices, compiled and run once:
    (compile seconds, run(batch) -> loss, the placed batches, the compiled HLO text)."""
    form = FORMS[impl](jax.devices()[:n])
    model = build_model(name, settings.quick)
    form.prepare_model(model)
    tx = optax.sgd(0.1, momentum=0.9)
    graphdef, state = create_train_state(model, tx)
    step = form.compile_train(lambda s, b, **kw: train_step(graphdef, tx, s, b, **kw))
    data = _batches(form, settings.inputs, batch * n, image)
    box: list[TrainState] = [form.put_state(state)]
    t0 = time.perf_counter()
    compiled = step.lower(box[0], *data[0]).compile()
    box[0], metrics = compiled(box[0], *data[0])
    jax_sync(metrics)
    compile_s = time.perf_counter() - t0

    def run(batch_dict):
        box[0], metrics = compiled(box[0], batch_dict)
        return metrics["loss"]

    return compile_s, run, data, compiled.as_text()


def profile(impl: str, n: int, run: Callable, data: list[tuple], hlo_text: str) -> dict:
    """Where a compiled step's device time goes (`compile_step`'s run, batches and HLO) in form
    `impl` on n devices: kernel time per category summed over the n devices
    (`benchmarks.profiling.profile_calls`) and the costliest collectives. A collective kernel's
    time includes its wait for the slowest device."""
    prof = profile_calls(lambda i: run(*data[i % len(data)]), PROFILE_STEPS, hlo_text)
    collectives = [op for op in prof["ops"] if op["category"] == "collective"]
    return {
        "impl": impl,
        "n_devices": n,
        "wall_ms": prof["wall_ms"],
        "device_ms_per_device": round(prof["device_ms"] / n, 4),
        "categories_all_devices": prof["categories"],
        "top_collectives": [
            {k: op[k] for k in ("op", "ms", "launches", "bytes", "source")}
            for op in collectives[:PROFILE_TOP]
        ],
    }


def run(settings: Settings, counts: tuple[int, ...] = DEVICE_COUNTS) -> Results:
    """Measure each model in each form at each device count the machine has."""
    res = Results("scaling", settings)
    available = jax.device_count()
    res.meta["not_run"] = [n for n in counts if n > available]
    batch = QUICK_BATCH if settings.quick else PER_DEVICE_BATCH
    image = QUICK_IMAGE if settings.quick else IMAGE
    largest = max((n for n in counts if n <= available), default=1)
    if largest > 1:
        res.meta["profiles"] = []
    for name in MODELS:
        base = None  # the one-device jit row's images/s
        for n in (n for n in counts if n <= available):
            for impl in forms_at(n):
                row = {"name": name, "impl": impl, "n_devices": n, "batch": batch}
                row.update(dtype="bfloat16 compute, float32 params", shape=[batch, image, image, 3])
                if impl == "jit_bn_group":
                    row["bn_group_size"] = bn_group_size(n)
                try:
                    compile_s, step, data, hlo_text = compile_step(
                        name, impl, n, settings, batch, image
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
                profiled = n == largest > 1 and impl in PROFILED and not settings.warm_only
                if profiled and "error" not in row:
                    try:
                        res.meta["profiles"].append(profile(impl, n, step, data, hlo_text))
                    except Exception as e:
                        res.meta["profiles"].append({"impl": impl, "error": error_text(e)})
    return res
