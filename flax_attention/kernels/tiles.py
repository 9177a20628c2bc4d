"""Pallas kernels over row tiles of an NHWC tensor viewed as (N, H*W, C).

Every kernel runs on a grid (N, T) of tiles (1, rows, C): the whole channel axis is in the tile,
so per-pixel reductions over C stay inside one program, and per-channel reductions over H*W are
written as one partial per tile, (N, T, 1, C) in float32, summed by XLA (T*C floats per image,
a few percent of the tensor). Per-channel vectors travel as (N, 1, C), per-pixel maps as
(N, H*W, 1). Arithmetic is float32; values that the XLA path rounds to the compute dtype are
rounded at the same places, so the forward equals the XLA path bit for bit.

The tiling suits TPU too (the last two block dims are the full C, or 1 over a full axis).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from flax_attention.kernels.dispatch import pallas_call

F32 = jnp.float32
MAX_TILE_BYTES = 32 * 1024  # one (rows, C) tile of x in the compute dtype


def tile_rows(hw: int, channels: int, itemsize: int) -> int:
    """Rows per tile: the largest divisor of `hw` that is a multiple of 8 (or `hw` itself)
    whose tile fits `MAX_TILE_BYTES`; the smallest such divisor when none fits."""
    legal = [r for r in range(1, hw + 1) if hw % r == 0 and (r % 8 == 0 or r == hw)]
    fitting = [r for r in legal if r * channels * itemsize <= MAX_TILE_BYTES]
    return max(fitting) if fitting else min(legal)


class Tiling:
    """Block specs and shapes for an (N, HW, C) tensor cut into (1, rows, C) tiles."""

    def __init__(self, n: int, hw: int, c: int, dtype, interpret=None):
        self.n, self.hw, self.c, self.dtype = n, hw, c, jnp.dtype(dtype)
        self.rows = tile_rows(hw, c, self.dtype.itemsize)
        self.grid = (n, hw // self.rows)
        self.interpret = interpret
        r = self.rows
        self.tile = pl.BlockSpec((1, r, c), lambda i, t: (i, t, 0))
        self.vec = pl.BlockSpec((1, 1, c), lambda i, t: (i, 0, 0))
        self.pix = pl.BlockSpec((1, r, 1), lambda i, t: (i, t, 0))
        self.part = pl.BlockSpec((1, 1, 1, c), lambda i, t: (i, t, 0, 0))

    def tensor(self, dtype=None) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct((self.n, self.hw, self.c), dtype or self.dtype)

    def pixels(self) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct((self.n, self.hw, 1), F32)

    def partial(self) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct((self.n, self.grid[1], 1, self.c), F32)

    def call(self, kernel: Callable, impl: str, ins: list, outs: list[tuple]) -> Callable:
        """pallas_call of `kernel` with input specs `ins` and (spec, shape) pairs `outs`."""
        return pallas_call(
            kernel,
            impl,
            grid=self.grid,
            in_specs=ins,
            out_specs=[spec for spec, _ in outs],
            out_shape=[shape for _, shape in outs],
            interpret=self.interpret,
        )


def _load(ref) -> jax.Array:
    return ref[0].astype(F32)


def _round(x: jax.Array, dtype) -> jax.Array:
    return x.astype(dtype).astype(F32)


def channel_pool(t: Tiling, impl: str, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Sum and max over H*W per channel: x (N, HW, C) -> two (N, C) float32."""

    def channel_pool_kernel(x_ref, sum_ref, max_ref):
        x = _load(x_ref)
        sum_ref[0, 0] = jnp.sum(x, axis=0, keepdims=True)
        max_ref[0, 0] = jnp.max(x, axis=0, keepdims=True)

    out = (t.part, t.partial())
    s, m = t.call(channel_pool_kernel, impl, [t.tile], [out, out])(x)
    return s.sum((1, 2)), m.max((1, 2))


def spatial_pool(t: Tiling, impl: str, x: jax.Array, cg: jax.Array) -> tuple[jax.Array, ...]:
    """Max and mean over C of `round(x * cg)` per pixel: (N, HW, C), (N, C) -> two (N, HW)."""
    dtype = t.dtype

    def spatial_pool_kernel(x_ref, cg_ref, max_ref, mean_ref):
        y1 = _round(_load(x_ref) * cg_ref[0].astype(F32), dtype)
        max_ref[0] = jnp.max(y1, axis=1, keepdims=True)
        mean_ref[0] = jnp.sum(y1, axis=1, keepdims=True) / y1.shape[1]

    outs = [(t.pix, t.pixels()), (t.pix, t.pixels())]
    mx, mean = t.call(spatial_pool_kernel, impl, [t.tile, t.vec], outs)(x, cg[:, None])
    return mx[..., 0], mean[..., 0]


def apply_gates(
    t: Tiling, impl: str, x: jax.Array, cg: jax.Array, sg: jax.Array | None
) -> jax.Array:
    """`round(round(x * cg) * sg)`: (N, HW, C), (N, C), (N, HW) or None -> (N, HW, C)."""
    dtype = t.dtype

    def apply_gates_kernel(x_ref, cg_ref, *rest):
        *sg_ref, y_ref = rest
        y = _round(_load(x_ref) * cg_ref[0].astype(F32), dtype)
        if sg_ref:
            y = y * sg_ref[0][0].astype(F32)
        y_ref[0] = y.astype(y_ref.dtype)

    ins, args = [t.tile, t.vec], [x, cg[:, None]]
    if sg is not None:
        ins, args = [*ins, t.pix], [*args, sg[..., None]]
    return t.call(apply_gates_kernel, impl, ins, [(t.tile, t.tensor())])(*args)[0]


def gate_grads(
    t: Tiling,
    impl: str,
    x: jax.Array,
    dy: jax.Array,
    cg: jax.Array,
    sg: jax.Array | None = None,
    chan_max: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array | None, jax.Array | None]:
    """Cotangents of the gates of `y = round(x * cg) * sg`, and the ties of the H*W max.

    Returns d cg = sum_HW(dy * sg * x) (N, C); d sg = sum_C(dy * round(x * cg)) (N, HW) when
    `sg` is given; and, when `chan_max` (N, C) is given, the number of pixels where x equals it
    (N, C), which the max pool's backward divides by (JAX's rule splits ties evenly).
    """
    dtype, has_sg, has_max = t.dtype, sg is not None, chan_max is not None

    def gate_grads_kernel(x_ref, dy_ref, cg_ref, *rest):
        rest = list(rest)
        sg_ref = rest.pop(0) if has_sg else None
        cmax_ref = rest.pop(0) if has_max else None
        dcg_ref = rest.pop(0)
        x, dy = _load(x_ref), _load(dy_ref)
        if has_sg:
            dsg_ref = rest.pop(0)
            y1 = _round(x * cg_ref[0].astype(F32), dtype)
            dsg_ref[0] = jnp.sum(dy * y1, axis=1, keepdims=True)
            dy = dy * sg_ref[0].astype(F32)
        dcg_ref[0, 0] = jnp.sum(dy * x, axis=0, keepdims=True)
        if has_max:
            hits = (x == cmax_ref[0].astype(F32)).astype(F32)
            rest.pop(0)[0, 0] = jnp.sum(hits, axis=0, keepdims=True)

    ins, args = [t.tile, t.tile, t.vec], [x, dy, cg[:, None]]
    outs = [(t.part, t.partial())]
    if has_sg:
        ins, args = [*ins, t.pix], [*args, sg[..., None]]
    if has_max:
        ins, args = [*ins, t.vec], [*args, chan_max[:, None]]
    if has_sg:
        outs.append((t.pix, t.pixels()))
    if has_max:
        outs.append((t.part, t.partial()))
    res = list(t.call(gate_grads_kernel, impl, ins, outs)(*args))
    dcg = res.pop(0).sum((1, 2))
    dsg = res.pop(0)[..., 0] if has_sg else None
    count = res.pop(0).sum((1, 2)) if has_max else None
    return dcg, dsg, count


def descriptor_grads(
    t: Tiling,
    impl: str,
    x: jax.Array,
    cg: jax.Array,
    pix_max: jax.Array,
    d_max: jax.Array,
    d_mean: jax.Array,
) -> jax.Array:
    """Backward of the per-pixel [max, mean] over C of `y1 = round(x * cg)` into cg.

    `dy1 = d_mean / C + d_max * [y1 == pix_max] / ties`; returns sum_HW(dy1 * x) (N, C).
    """
    dtype = t.dtype

    def descriptor_grads_kernel(x_ref, cg_ref, pmax_ref, dmax_ref, dmean_ref, dcg_ref):
        x = _load(x_ref)
        dy1 = _pixel_grad(x, cg_ref, pmax_ref, dmax_ref, dmean_ref, dtype)
        dcg_ref[0, 0] = jnp.sum(dy1 * x, axis=0, keepdims=True)

    ins = [t.tile, t.vec, t.pix, t.pix, t.pix]
    args = [x, cg[:, None], pix_max[..., None], d_max[..., None], d_mean[..., None]]
    (dcg,) = t.call(descriptor_grads_kernel, impl, ins, [(t.part, t.partial())])(*args)
    return dcg.sum((1, 2))


def _pixel_grad(x, cg_ref, pmax_ref, dmax_ref, dmean_ref, dtype) -> jax.Array:
    """dL/dy1 (rows, C) from the per-pixel descriptor cotangents."""
    y1 = _round(x * cg_ref[0].astype(F32), dtype)
    hits = (y1 == pmax_ref[0].astype(F32)).astype(F32)
    share = dmax_ref[0] / jnp.sum(hits, axis=1, keepdims=True)
    return dmean_ref[0] / x.shape[1] + hits * share


def input_grad(
    t: Tiling,
    impl: str,
    x: jax.Array,
    dy: jax.Array,
    cg: jax.Array,
    d_sum: jax.Array,
    spatial: tuple[jax.Array, ...] | None = None,
    max_pool: tuple[jax.Array, jax.Array] | None = None,
) -> jax.Array:
    """dL/dx of `y = round(x * cg) * sg` with cg a function of the H*W pools of x.

    `dx = dy * sg * cg + dy1 * cg + d_sum + d_max * [x == chan_max]`, where `d_sum` (N, C) is
    the cotangent of the H*W sum; `spatial = (sg, pix_max, d_max, d_mean)` (each (N, HW)) adds
    the spatial gate and its descriptor's cotangent dy1; `max_pool = (chan_max, d_max)` (N, C)
    adds the H*W max pool's (`d_max` already divided by the number of ties).
    """
    dtype = t.dtype
    has_spatial, has_max = spatial is not None, max_pool is not None

    def input_grad_kernel(x_ref, dy_ref, cg_ref, dsum_ref, *rest):
        rest = list(rest)
        dx_ref = rest.pop()
        x, dy = _load(x_ref), _load(dy_ref)
        cg = cg_ref[0].astype(F32)
        dx = dsum_ref[0] + 0.0 * x
        if has_spatial:
            sg_ref, pmax_ref, dmax_ref, dmean_ref = rest[:4]
            rest = rest[4:]
            dy1 = dy * sg_ref[0] + _pixel_grad(x, cg_ref, pmax_ref, dmax_ref, dmean_ref, dtype)
            dx = dx + dy1 * cg
        else:
            dx = dx + dy * cg
        if has_max:
            cmax_ref, cdmax_ref = rest
            dx = dx + cdmax_ref[0] * (x == cmax_ref[0].astype(F32)).astype(F32)
        dx_ref[0] = dx.astype(dx_ref.dtype)

    ins, args = [t.tile, t.tile, t.vec, t.vec], [x, dy, cg[:, None], d_sum[:, None]]
    if has_spatial:
        ins += [t.pix] * 4
        args += [a[..., None] for a in spatial]
    if has_max:
        ins += [t.vec, t.vec]
        args += [a[:, None] for a in max_pool]
    return t.call(input_grad_kernel, impl, ins, [(t.tile, t.tensor())])(*args)[0]
