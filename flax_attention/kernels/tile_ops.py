"""The tile algebra a kernel pass is written in: reads, broadcasts and reductions.

A pass (kernels/passes.py) sees three kinds of values: tiles (rows, cb) of an NHWC tensor viewed
as (N, H*W, C), per-channel vectors (one value per channel of the tile) and per-pixel vectors
(one value per row). Arithmetic is float32; `round` rounds to the compute dtype where the XLA
path rounds.

`ArrayOps` keeps vectors as broadcastable arrays, channels (..., 1, cb) and pixels (..., rows, 1):
it serves XLA on whole tensors, `pl.pallas_call` (TPU, interpreters) and the Mosaic GPU
interpreter. `MosaicOps` holds values in Mosaic GPU register layouts: a (rows, 256) tile is split
over 4 warps x 32 lanes x 2 adjacent channels, so sums over rows stay inside each thread; a sum
over channels goes across lanes and warps.
"""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
from jax import lax

F32 = jnp.float32
MOSAIC_CHANNELS = 256  # channels per Mosaic GPU tile: 4 warps x 32 lanes x 2


class ArrayOps:
    """Vectors with kept dims: per-channel (..., 1, cb), per-pixel (..., rows, 1)."""

    def __init__(self, dtype):
        self.dtype = jnp.dtype(dtype)

    def round(self, v: jax.Array) -> jax.Array:
        """`v` rounded to the compute dtype, kept in float32. `reduce_precision` because XLA
        may drop a float32 -> bf16 -> float32 round trip (excess precision), and the passes
        must round alike for the maxima they compare to match."""
        info = jnp.finfo(self.dtype)
        return lax.reduce_precision(v, exponent_bits=info.nexp, mantissa_bits=info.nmant)

    def per_channel(self, v: jax.Array) -> jax.Array:
        return v

    def per_pixel(self, p: jax.Array) -> jax.Array:
        return p

    def channel_sum(self, t: jax.Array) -> jax.Array:
        return jnp.sum(t, axis=-2, keepdims=True)

    def channel_max(self, t: jax.Array) -> jax.Array:
        return jnp.max(t, axis=-2, keepdims=True)

    def pixel_sum(self, t: jax.Array) -> jax.Array:
        return jnp.sum(t, axis=-1, keepdims=True)

    def pixel_max(self, t: jax.Array) -> jax.Array:
        return jnp.max(t, axis=-1, keepdims=True)

    def indicator(self, mask: jax.Array) -> jax.Array:
        return mask.astype(F32)

    def load_tile(self, ref) -> jax.Array:
        return ref[...].astype(F32)

    def load_channels(self, ref) -> jax.Array:
        return ref[...].astype(F32).reshape(1, -1)

    def load_pixels(self, ref) -> jax.Array:
        return ref[...].astype(F32).reshape(-1, 1)

    def fill_channels(self, value: float, cb: int) -> jax.Array:
        return jnp.full((1, cb), value, F32)

    def store(self, ref, v: jax.Array) -> None:
        ref[...] = v.reshape(ref.shape).astype(ref.dtype)


def _mosaic_load(ref, layout, optimized: bool) -> jax.Array:
    """`plgpu.load` of a whole ref; jax 0.10 requires the `idx` argument, 0.11 deprecates it."""
    from jax.experimental.pallas import mosaic_gpu as plgpu

    needs_idx = inspect.signature(plgpu.load).parameters["idx"].default is inspect.Parameter.empty
    return plgpu.load(ref, *(((),) if needs_idx else ()), layout=layout, optimized=optimized)


class MosaicOps(ArrayOps):
    """Mosaic GPU register layouts for (rows, 256) tiles; vectors are 1D: (256,) and (rows,)."""

    def __init__(self, dtype, rows: int):
        from jax.experimental.pallas import mosaic_gpu as plgpu

        super().__init__(dtype)
        self.shape = (rows, MOSAIC_CHANNELS)
        tiling = plgpu.Tiling(((1, MOSAIC_CHANNELS), (MOSAIC_CHANNELS // 4,), (2,)))
        self.tile = plgpu.Layout.TILED(tiling, warp_dims=(-3,), lane_dims=(-2,), vector_dim=-1)
        self.channels = self.tile.reduce(0)
        self.pixels = self.tile.reduce(1)
        self._cast = plgpu.layout_cast

    def round(self, v: jax.Array) -> jax.Array:
        return v.astype(self.dtype).astype(F32)

    def per_channel(self, v: jax.Array) -> jax.Array:
        return self._cast(lax.broadcast_in_dim(v, self.shape, (1,)), self.tile)

    def per_pixel(self, p: jax.Array) -> jax.Array:
        return self._cast(lax.broadcast_in_dim(p, self.shape, (0,)), self.tile)

    def channel_sum(self, t: jax.Array) -> jax.Array:
        return jnp.sum(t, axis=0)

    def channel_max(self, t: jax.Array) -> jax.Array:
        return jnp.max(t, axis=0)

    def pixel_sum(self, t: jax.Array) -> jax.Array:
        return jnp.sum(t, axis=1)

    def pixel_max(self, t: jax.Array) -> jax.Array:
        return jnp.max(t, axis=1)

    def indicator(self, mask: jax.Array) -> jax.Array:
        return jnp.where(mask, 1.0, 0.0)

    def load_tile(self, ref) -> jax.Array:
        return _mosaic_load(ref, self.tile, optimized=True).astype(F32)

    def load_channels(self, ref) -> jax.Array:
        return _mosaic_load(ref, self.channels, optimized=False).astype(F32)

    def load_pixels(self, ref) -> jax.Array:
        return _mosaic_load(ref, self.pixels, optimized=False).astype(F32)

    def fill_channels(self, value: float, cb: int) -> jax.Array:
        return self._cast(jnp.full((cb,), value, F32), self.channels)

    def store(self, ref, v: jax.Array) -> None:
        ref[...] = v.astype(ref.dtype)
