"""ResNet's stem max pool (3x3, stride 2, padding 1 with -inf) with a gather- and scatter-free VJP.

PyTorch's `MaxPool2d(3, stride=2, padding=1)` on NHWC input `(N, H, W, C)` -> `(N, Ho, Wo, C)`,
`Ho = (H - 1) // 2 + 1`. The gradient of a window's maximum goes to the first maximal element in
row-major window order (a NaN wins over numbers, the last NaN over earlier ones): PyTorch's
rule, and the one XLA's `select_and_scatter` applies to the reference.

`max_pool_3x3_s2` keeps each window's winning tap (0..8, int8) from the forward. Its backward
needs no scatter: with stride 2 an even input row belongs to one window row (its middle tap) and
an odd one to two (the bottom tap of the window above, the top tap of the one below), so each of
the four row/column parity planes of the input gradient is a sum of at most four shifted,
masked copies of the output gradient, and the planes interleave into the result. It reads the
output gradient and the taps once and writes the input gradient once.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

_WINDOW, _STRIDE = 3, 2
# Input rows of parity 0 / 1 as (offset of the window row from the input row's half, tap row).
_SOURCES = (((0, 1),), ((0, 2), (1, 0)))


def max_pool_3x3_s2_reference(x: jax.Array) -> jax.Array:
    """The pool through `nnx.max_pool` (XLA's reduce_window; select_and_scatter backward)."""
    return nnx.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


def _out_size(n: int) -> int:
    return (n - 1) // _STRIDE + 1


def _taps(x: jax.Array) -> list[jax.Array]:
    """The 9 window taps of `x` in row-major order, each `(N, Ho, Wo, C)`, padding -inf."""
    h, w = x.shape[1], x.shape[2]
    ho, wo = _out_size(h), _out_size(w)
    pad_rows, pad_cols = 2 * ho + 1 - h, 2 * wo + 1 - w
    neg = jnp.array(-jnp.inf, x.dtype)
    xp = jnp.pad(x, ((0, 0), (1, pad_rows), (1, pad_cols), (0, 0)), constant_values=neg)
    return [
        xp[:, dy : dy + 2 * ho : 2, dx : dx + 2 * wo : 2]
        for dy in range(_WINDOW)
        for dx in range(_WINDOW)
    ]


def _forward(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Each window's maximum and the index (int8, row-major) of the tap that wins it."""
    taps = _taps(x)
    best, winner = taps[0], jnp.zeros(taps[0].shape, jnp.int8)
    for t, value in enumerate(taps[1:], start=1):
        take = (value > best) | jnp.isnan(value)
        best = jnp.where(take, value, best)
        winner = jnp.where(take, jnp.int8(t), winner)
    return best, winner


def _input_grad(g: jax.Array, winner: jax.Array, h: int, w: int) -> jax.Array:
    """Scatter-free backward: `g` and `winner` `(N, Ho, Wo, C)` -> the gradient of the
    `(N, h, w, C)` input."""
    n, ho, wo, c = g.shape
    g_pad = jnp.pad(g, ((0, 0), (0, 1), (0, 1), (0, 0)))
    winner_pad = jnp.pad(winner, ((0, 0), (0, 1), (0, 1), (0, 0)), constant_values=-1)

    def plane(row_parity: int, col_parity: int) -> jax.Array:
        total = jnp.zeros(g.shape, g.dtype)
        for dr, tap_row in _SOURCES[row_parity]:
            for dc, tap_col in _SOURCES[col_parity]:
                window = (slice(None), slice(dr, dr + ho), slice(dc, dc + wo))
                hit = winner_pad[window] == _WINDOW * tap_row + tap_col
                total = total + jnp.where(hit, g_pad[window], jnp.zeros((), g.dtype))
        return total

    rows = [jnp.stack([plane(pr, pc) for pc in (0, 1)], axis=3) for pr in (0, 1)]
    grad = jnp.stack(rows, axis=2)  # (N, Ho, 2, Wo, 2, C)
    return grad.reshape(n, 2 * ho, 2 * wo, c)[:, :h, :w]


def max_pool_3x3_s2(x: jax.Array) -> jax.Array:
    """3x3 max pool, stride 2, padding 1 (-inf): NHWC `(N, H, W, C)` -> `(N, Ho, Wo, C)`."""
    return _pool(x.shape[1], x.shape[2], x)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _pool(h: int, w: int, x: jax.Array) -> jax.Array:
    return _forward(x)[0]


def _pool_fwd(h: int, w: int, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    return _forward(x)


def _pool_bwd(h: int, w: int, winner: jax.Array, g: jax.Array) -> tuple[jax.Array]:
    return (_input_grad(g, winner, h, w),)


_pool.defvjp(_pool_fwd, _pool_bwd)
