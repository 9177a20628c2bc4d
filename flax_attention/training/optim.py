"""Optimizers, learning-rate schedules and the weight-decay mask, as registries.

Weight decay applies to convolution and linear kernels only (variables named `kernel`), never
to BatchNorm scales/biases or linear biases.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import optax


def decay_mask(params):
    """A tree like `params` that is True at conv/linear kernels, False elsewhere."""

    def is_kernel(path, _):
        return any(getattr(key, "key", None) == "kernel" for key in path)

    return jax.tree_util.tree_map_with_path(is_kernel, params)


def cosine(peak: float, warmup_steps: int, total_steps: int) -> optax.Schedule:
    """Linear warm-up from 0 to `peak` over `warmup_steps`, then cosine decay to 0."""
    return optax.warmup_cosine_decay_schedule(
        0.0, peak, warmup_steps, max(total_steps, warmup_steps + 1), end_value=0.0
    )


def constant(peak: float, warmup_steps: int, total_steps: int) -> optax.Schedule:
    """Linear warm-up from 0 to `peak` over `warmup_steps`, then constant."""
    del total_steps
    if warmup_steps == 0:
        return optax.constant_schedule(peak)
    return optax.join_schedules(
        [optax.linear_schedule(0.0, peak, warmup_steps), optax.constant_schedule(peak)],
        [warmup_steps],
    )


SCHEDULES: dict[str, Callable[[float, int, int], optax.Schedule]] = {
    "cosine": cosine,
    "constant": constant,
}


def sgd(lr: optax.Schedule, weight_decay: float, momentum: float, nesterov: bool):
    """PyTorch's SGD: decay added to the gradient, then momentum (dampening 0), then -lr."""
    return optax.chain(
        optax.add_decayed_weights(weight_decay, mask=decay_mask),
        optax.sgd(lr, momentum=momentum or None, nesterov=nesterov),
    )


def lars(lr: optax.Schedule, weight_decay: float, momentum: float, nesterov: bool):
    """LARS (large-batch SGD): trust ratio and decay on kernels only."""
    return optax.lars(
        lr,
        weight_decay=weight_decay,
        weight_decay_mask=decay_mask,
        trust_ratio_mask=decay_mask,
        momentum=momentum,
        nesterov=nesterov,
    )


def adamw(lr: optax.Schedule, weight_decay: float, momentum: float, nesterov: bool):
    """AdamW (b1 = `momentum`, decoupled decay on kernels only); `nesterov` is ignored."""
    del nesterov
    return optax.adamw(lr, b1=momentum, weight_decay=weight_decay, mask=decay_mask)


OPTIMIZERS: dict[str, Callable[..., optax.GradientTransformation]] = {
    "sgd": sgd,
    "lars": lars,
    "adamw": adamw,
}


def make_schedule(name: str, *, lr: float, warmup_steps: int, total_steps: int) -> optax.Schedule:
    """Learning-rate schedule `name` (see `SCHEDULES`) peaking at `lr`."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; choose one of {sorted(SCHEDULES)}")
    return SCHEDULES[name](lr, warmup_steps, total_steps)


def make_optimizer(
    name: str,
    lr: optax.Schedule | float,
    *,
    weight_decay: float = 0.0,
    momentum: float = 0.9,
    nesterov: bool = False,
) -> optax.GradientTransformation:
    """Optimizer `name` (see `OPTIMIZERS`) with learning rate `lr` (a schedule or a constant)."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {sorted(OPTIMIZERS)}")
    return OPTIMIZERS[name](lr, weight_decay, momentum, nesterov)
