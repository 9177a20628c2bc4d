"""Parallel grouped convolutions over one input (PSA's branches) in three formulations.

Every branch i convolves the same NHWC input with its own grouped kernel, HWIO
`(k_i, k_i, in / g_i, split)`, stride s, padding k_i // 2; the outputs are the branch list. The
formulations compute the same sums (they differ only in the order of float32 additions):
- `grouped`: one `lax.conv` per branch with `feature_group_count=g_i`;
- `dense`: one conv per branch with the kernel scattered into a block-diagonal dense kernel
  (g_i times the FLOPs, but the matrix units run at full width);
- `merged`: one conv for all branches, every block-diagonal kernel zero-padded to the largest
  size and centred, outputs concatenated then split.
Which one a PSA module runs per branch is layers.policy's choice (op "psa", `DenseUpTo`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from flax_attention.layers.common import conv_nhwc

Branch = tuple[jax.Array, int]  # (grouped HWIO kernel, groups)


def block_diagonal(kernel: jax.Array, groups: int) -> jax.Array:
    """(k, k, in/g, out) grouped kernel -> (k, k, in, out) dense kernel, zeros across groups."""
    k, _, cin, out = kernel.shape
    per_group = kernel.reshape(k, k, cin, groups, out // groups)
    eye = jnp.eye(groups, dtype=kernel.dtype)
    dense = per_group[:, :, None] * eye[:, None, :, None]  # (k, k, g_in, cin, g_out, cout)
    return dense.reshape(k, k, groups * cin, out)


def _centred(kernel: jax.Array, size: int) -> jax.Array:
    p = (size - kernel.shape[0]) // 2
    return jnp.pad(kernel, ((p, p), (p, p), (0, 0), (0, 0)))


def grouped(x: jax.Array, branches: Sequence[Branch], stride: int) -> list[jax.Array]:
    return [conv_nhwc(x, kernel, stride, g) for kernel, g in branches]


def dense(x: jax.Array, branches: Sequence[Branch], stride: int) -> list[jax.Array]:
    return [conv_nhwc(x, block_diagonal(kernel, g), stride) for kernel, g in branches]


def merged(x: jax.Array, branches: Sequence[Branch], stride: int) -> list[jax.Array]:
    size = max(kernel.shape[0] for kernel, _ in branches)
    kernels = [_centred(block_diagonal(kernel, g), size) for kernel, g in branches]
    y = conv_nhwc(x, jnp.concatenate(kernels, axis=-1), stride)
    bounds = [kernel.shape[-1] for kernel, _ in branches]
    return jnp.split(y, [sum(bounds[:i]) for i in range(1, len(bounds))], axis=-1)


FORMULATIONS: dict[str, Callable[[jax.Array, Sequence[Branch], int], list[jax.Array]]] = {
    "grouped": grouped,
    "dense": dense,
    "merged": merged,
}


def branch_convs(
    x: jax.Array, branches: Sequence[Branch], stride: int, formulations: Sequence[str]
) -> list[jax.Array]:
    """Every branch's output, each branch computed as `formulations[i]` says (NHWC)."""
    if all(f == "merged" for f in formulations):
        return merged(x, branches, stride)
    return [
        FORMULATIONS[f](x, [branch], stride)[0]
        for f, branch in zip(formulations, branches, strict=True)
    ]
