"""Full training steps: images/s of ResNet-50-class models, ours against PyTorch.

Ours: `nnx.split` once, then a pure step (forward, cross-entropy, backward, SGD with momentum
through optax) under `jax.jit` with the parameters, the other state and the optimizer state
donated; bf16 compute, float32 parameters; synthetic NHWC data already on the device, several
batches rotated; steps queued with no host sync in the loop. First-step compile time and the
compiled step's memory (arguments + temporaries + outputs) are recorded.

PyTorch: timm's resnet50/seresnet50 where timm imports, our flax_attention.reference
models for the others; channels_last, autocast bf16, SGD momentum, eager and torch.compile.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from benchmarks.charts import ChartSpec, series
from benchmarks.device import torch_cuda
from benchmarks.results import Results, error_text
from benchmarks.settings import Settings
from benchmarks.timing import jax_sync, time_fn, torch_compile, torch_sync
from flax_attention.architectures.blocks import NO_FORMULATIONS
from flax_attention.layers.policy import Formulations
from flax_attention.models import create_model

MODELS = ("resnet50", "seresnet50", "cbam_resnet50", "bam_resnet50", "epsanet50_small")
TIMM = {"resnet50": "resnet50", "seresnet50": "seresnet50"}
BATCH, QUICK_BATCH = 256, 2
IMAGE, QUICK_IMAGE = 224, 64
NUM_CLASSES = 1000

CHART = ChartSpec(
    value="img_per_s",
    label="images / s (training step)",
    group=lambda r: r["name"],
    series=series,
)


def make_step(model: nnx.Module, tx: optax.GradientTransformation):
    """A pure jitted step over (params, rest, opt_state, x, y) -> (params, rest, opt_state, loss)."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss_fn(params, rest, x, y):
        m = nnx.merge(graphdef, params, rest)
        logits = m(x).astype(jnp.float32)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, nnx.split(m, nnx.Param, ...)[2]

    def step(params, rest, opt_state, x, y):
        grad_fn = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)
        (loss, rest), (grads, _) = grad_fn(params, rest, x, y)  # rest: zero grads, dropped
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), rest, opt_state, loss

    return jax.jit(step, donate_argnums=(0, 1, 2)), (params, rest, tx.init(params))


@dataclass
class FlaxStep:
    """A compiled training step of one model with its state and rotated device batches."""

    compiled: Any
    state: list
    data: list[tuple[jax.Array, jax.Array]]
    compile_s: float
    peak_bytes: int | None

    def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
        *self.state, loss = self.compiled(*self.state, x, y)
        return loss


def flax_step(
    name: str, batch: int, image: int, inputs: int, formulations: Formulations = NO_FORMULATIONS
) -> FlaxStep:
    """Build, compile (timed) and return the train suite's step for model `name`, computed as
    `formulations` says (layers.policy; "auto" for the operations it does not name)."""
    model = create_model(
        name,
        num_classes=NUM_CLASSES,
        rngs=nnx.Rngs(0),
        dtype=jnp.bfloat16,
        param_dtype=jnp.float32,
        formulations=formulations,
    )
    model.train()
    step, state = make_step(model, optax.sgd(0.1, momentum=0.9))
    del model
    keys = jax.random.split(jax.random.key(0), inputs)
    data = [
        (
            jax.random.normal(k, (batch, image, image, 3), jnp.float32).astype(jnp.bfloat16),
            jax.random.randint(k, (batch,), 0, NUM_CLASSES),
        )
        for k in keys
    ]
    t0 = time.perf_counter()
    compiled = step.lower(*state, *data[0]).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    peak = None
    if mem is not None:
        peak = (
            mem.argument_size_in_bytes
            + mem.temp_size_in_bytes
            + mem.output_size_in_bytes
            - mem.alias_size_in_bytes
        )
    return FlaxStep(compiled, list(state), data, compile_s, peak)


def flax_row(name: str, settings: Settings, batch: int, image: int) -> dict:
    return step_row(flax_step(name, batch, image, settings.inputs), settings, batch)


def step_row(step: FlaxStep, settings: Settings, batch: int) -> dict:
    """A built step's row: compile time, peak memory and (unless warming) its timing, img/s."""
    row = {
        "compile_s": round(step.compile_s, 2),
        "peak_mem_gb": round(step.peak_bytes / 2**30, 3) if step.peak_bytes else None,
    }
    if settings.warm_only:  # compiled into the cache; running it would only hold memory
        return row
    timing = time_fn(step, step.data, jax_sync, settings)
    return {**timing.as_dict(), "img_per_s": round(batch / timing.median_ms * 1e3, 1), **row}


def torch_model(name: str, torch):
    try:
        import timm

        if name in TIMM:
            return timm.create_model(TIMM[name], num_classes=NUM_CLASSES), "timm"
    except ImportError:
        pass
    from flax_attention.reference.models import torch_model as reference_model

    return reference_model(name, NUM_CLASSES), "flax_attention.reference"


def torch_row(name: str, compiled: bool, settings: Settings, batch: int, image: int) -> dict:
    torch = torch_cuda()
    model, source = torch_model(name, torch)
    model = model.to("cuda", memory_format=torch.channels_last).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    fwd = torch_compile(model) if compiled else model
    loss_fn = torch.nn.CrossEntropyLoss()

    def run(x, y):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_fn(fwd(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    data = [
        (
            torch.randn(batch, 3, image, image, device="cuda").contiguous(
                memory_format=torch.channels_last
            ),
            torch.randint(0, NUM_CLASSES, (batch,), device="cuda"),
        )
        for _ in range(settings.inputs)
    ]
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    run(*data[0])
    torch.cuda.synchronize()
    first_s = time.perf_counter() - t0
    timing = time_fn(run, data, torch_sync, settings)
    return {
        **timing.as_dict(),
        "img_per_s": round(batch / timing.median_ms * 1e3, 1),
        "compile_s": round(first_s, 2),
        "peak_mem_gb": round(torch.cuda.max_memory_allocated() / 2**30, 3),
        "source": source,
    }


def run(
    settings: Settings,
    models: tuple[str, ...] = MODELS,
    frameworks: tuple[str, ...] = ("flax", "torch", "torch.compile"),
) -> Results:
    """Measure every model in every framework; returns the suite's results."""
    res = Results("train", settings)
    batch = QUICK_BATCH if settings.quick else BATCH
    image = QUICK_IMAGE if settings.quick else IMAGE
    bases = {
        name: {
            "name": name,
            "batch": batch,
            "shape": [batch, image, image, 3],
            "dtype": "bfloat16 compute, float32 params",
        }
        for name in models
    }
    if "flax" in frameworks:  # ours first: a run cut short keeps the rows that matter most
        for name in models:
            row = {**bases[name], "framework": "flax"}
            try:
                row.update(flax_row(name, settings, batch, image))
            except Exception as e:
                row["error"] = error_text(e)
            res.add(row)
    for framework in ("torch", "torch.compile"):
        if framework not in frameworks or torch_cuda() is None:
            continue
        for name in models:
            row = {**bases[name], "framework": framework}
            try:
                row.update(torch_row(name, framework == "torch.compile", settings, batch, image))
            except Exception as e:
                row["error"] = error_text(e)
            res.add(row)
    return res
