"""Classification loss and accuracy on logits (N, num_classes), labels int (N,)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
    """Per-example softmax cross-entropy (N,) in float32, with optional label smoothing.

    Smoothing follows PyTorch's `CrossEntropyLoss(label_smoothing=s)`: the target is
    `(1 - s) * one_hot + s / num_classes`.
    """
    logits = logits.astype(jnp.float32)
    num_classes = logits.shape[-1]
    targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), label_smoothing)
    return optax.softmax_cross_entropy(logits, targets)


def top_k_correct(logits: jax.Array, labels: jax.Array, k: int) -> jax.Array:
    """1.0 where `labels` is among the `k` largest logits, else 0.0: float32 (N,)."""
    k = min(k, logits.shape[-1])
    _, top = jax.lax.top_k(logits.astype(jnp.float32), k)
    return jnp.any(top == labels[:, None], axis=-1).astype(jnp.float32)
