"""Executors: run a `Pass` over an NHWC tensor viewed as (N, HW, C).

- `Xla`: the step on whole tensors; XLA fuses each pass into one loop.
- `PallasCall`: `pl.pallas_call` on a grid (N, G, T) of (rows, cb) tiles, one tile per program;
  reductions are written as one partial per tile (channels) or per channel block (pixels) and
  folded by XLA. Lowers for TPU (last block dims are 256, the full C, or 1) and runs in the
  interpreters on CPU.
- `MosaicGpu`: `plgpu.kernel` on a grid (N, G, S) of thread blocks; each pipelines its T/S row
  tiles through shared memory with TMA (`plgpu.emit_pipeline`), keeps per-channel reductions in
  registers across tiles, and reads per-pixel inputs / writes per-pixel partials directly in
  global memory. Output tiles leave by TMA from shared memory (`tma_stores`) or straight from
  registers. `interpret=` runs the same kernel in the Mosaic GPU interpreter on CPU with
  `ArrayOps` in place of the register layouts (jax 0.10's interpreter has no predicated TMA
  stores, so it runs with `tma_stores=False`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from flax_attention.kernels.passes import Pass
from flax_attention.kernels.tile_ops import F32, MOSAIC_CHANNELS, ArrayOps, MosaicOps

FOLDS: dict[str, Callable[..., jax.Array]] = {
    "channel_sum": jnp.sum,
    "channel_max": jnp.max,
    "pixel_sum": jnp.sum,
    "pixel_max": jnp.max,
}
INITIAL = {"channel_sum": 0.0, "channel_max": -jnp.inf}


@dataclass(frozen=True)
class Problem:
    """An (N, HW, C) tensor of `dtype` to be cut into tiles."""

    n: int
    hw: int
    c: int
    dtype: Any

    @property
    def itemsize(self) -> int:
        return jnp.dtype(self.dtype).itemsize


def divisors(k: int) -> list[int]:
    return [d for d in range(1, k + 1) if k % d == 0]


def _kinds(p: Pass, prefix: str) -> list[str]:
    return [name for name, kind in p.outputs if kind.startswith(prefix)]


def _outputs(p: Pass, results: dict[str, jax.Array]) -> dict[str, jax.Array]:
    return {name: results[name] for name, _ in p.outputs}


class Xla:
    """The step on whole tensors: channels (N, 1, C), pixels (N, HW, 1)."""

    def unsupported(self, problem: Problem) -> str | None:
        return None

    def __call__(self, p: Pass, problem: Problem, **inputs: jax.Array) -> dict[str, jax.Array]:
        ops = ArrayOps(problem.dtype)
        args = {k: inputs[k].astype(F32) for k in p.tiles}
        args |= {k: inputs[k][:, None, :].astype(F32) for k in p.channels}
        args |= {k: inputs[k][..., None].astype(F32) for k in p.pixels}
        res = p.step(ops, **args)
        kinds = dict(p.outputs)
        out = {}
        for name, value in res.items():
            kind = kinds[name]
            if kind == "tile":
                out[name] = value.astype(problem.dtype)
            elif kind.startswith("channel"):
                out[name] = value[:, 0, :]
            else:
                out[name] = value[..., 0]
        return _outputs(p, out)


def pallas_rows(hw: int, cb: int, itemsize: int, max_bytes: int = 32 * 1024) -> int:
    """Rows per pallas_call tile: the largest divisor of `hw` that is a multiple of 8 (or `hw`)
    whose (rows, cb) tile fits `max_bytes`; the smallest such divisor when none fits."""
    legal = [r for r in divisors(hw) if r % 8 == 0 or r == hw]
    fitting = [r for r in legal if r * cb * itemsize <= max_bytes]
    return max(fitting) if fitting else min(legal)


def pallas_channels(c: int) -> int:
    return MOSAIC_CHANNELS if c % MOSAIC_CHANNELS == 0 else c


@dataclass(frozen=True)
class PallasCall:
    """`pl.pallas_call` with backend keyword arguments (`interpret=`, `compiler_params=`)."""

    backend: Callable[[], dict[str, Any]]

    def unsupported(self, problem: Problem) -> str | None:
        return None

    def __call__(self, p: Pass, problem: Problem, **inputs: jax.Array) -> dict[str, jax.Array]:
        n, hw, c = problem.n, problem.hw, problem.c
        cb = pallas_channels(c)
        rows = pallas_rows(hw, cb, problem.itemsize)
        g, t = c // cb, hw // rows
        tile = pl.BlockSpec((None, rows, cb), lambda i, j, k: (i, k, j))
        chan = pl.BlockSpec((None, 1, cb), lambda i, j, k: (i, 0, j))
        pix = pl.BlockSpec((None, rows, 1), lambda i, j, k: (i, k, 0))
        chan_part = pl.BlockSpec((None, None, 1, cb), lambda i, j, k: (i, k, 0, j))
        pix_part = pl.BlockSpec((None, None, rows, 1), lambda i, j, k: (i, j, k, 0))
        specs = {"tile": tile, "channel": chan_part, "pixel": pix_part}
        shapes = {
            "tile": jax.ShapeDtypeStruct((n, hw, c), problem.dtype),
            "channel": jax.ShapeDtypeStruct((n, t, 1, c), F32),
            "pixel": jax.ShapeDtypeStruct((n, g, hw, 1), F32),
        }
        kinds = [kind.split("_")[0] for _, kind in p.outputs]
        ops = ArrayOps(problem.dtype)

        def kernel(*refs):
            ins, outs = refs[: -len(kinds)], refs[-len(kinds) :]
            names = [*p.tiles, *p.channels, *p.pixels]
            loaders = [ops.load_tile] * len(p.tiles) + [ops.load_channels] * len(p.channels)
            loaders += [ops.load_pixels] * len(p.pixels)
            args = {k: load(r) for k, load, r in zip(names, loaders, ins, strict=True)}
            res = p.step(ops, **args)
            for (name, _), ref in zip(p.outputs, outs, strict=True):
                ops.store(ref, res[name])

        kernel.__name__ = p.name
        args = [inputs[k] for k in p.tiles]
        args += [inputs[k][:, None, :] for k in p.channels]
        args += [inputs[k][..., None].astype(F32) for k in p.pixels]
        in_specs = [tile] * len(p.tiles) + [chan] * len(p.channels) + [pix] * len(p.pixels)
        raw = pl.pallas_call(
            kernel,
            grid=(n, g, t),
            in_specs=in_specs,
            out_specs=[specs[k] for k in kinds],
            out_shape=[shapes[k] for k in kinds],
            name=p.name,
            **self.backend(),
        )(*args)
        out = {}
        for (name, kind), value in zip(p.outputs, raw, strict=True):
            if kind == "tile":
                out[name] = value
            elif kind.startswith("channel"):
                out[name] = FOLDS[kind](value, axis=(1, 2))
            else:
                out[name] = FOLDS[kind](value[..., 0], axis=1)
        return out


def mosaic_rows(hw: int, itemsize: int, max_bytes: int = 16 * 1024) -> int:
    """Rows per Mosaic GPU tile: the largest divisor of `hw` whose (rows, 256) tile fits."""
    fitting = [r for r in divisors(hw) if r * MOSAIC_CHANNELS * itemsize <= max_bytes]
    return max(fitting)


def mosaic_split(t: int, blocks: int, sms: int) -> int:
    """Smallest divisor s of the `t` row tiles giving blocks * s >= 2 * sms thread blocks."""
    return next((s for s in divisors(t) if blocks * s >= 2 * sms), t)


@dataclass(frozen=True)
class MosaicGpu:
    """`plgpu.kernel` + `plgpu.emit_pipeline`; `interpret` runs it in the Mosaic GPU
    interpreter (CPU) with `ArrayOps`."""

    interpret: Any = None
    sms: int = 132
    smem_bytes: int = 160 * 1024  # budget for the pipelined tiles of one thread block
    tma_stores: bool = True  # output tiles by TMA from shared memory; False: from registers

    def unsupported(self, problem: Problem) -> str | None:
        if problem.c % MOSAIC_CHANNELS:
            return f"C={problem.c} is not a multiple of {MOSAIC_CHANNELS}"
        if self.interpret is None and jnp.dtype(problem.dtype) not in (
            jnp.dtype(jnp.bfloat16),
            jnp.dtype(jnp.float16),
        ):
            return f"dtype {jnp.dtype(problem.dtype).name} (16-bit inputs only)"
        return None

    def __call__(self, p: Pass, problem: Problem, **inputs: jax.Array) -> dict[str, jax.Array]:
        from jax.experimental.pallas import mosaic_gpu as plgpu

        if reason := self.unsupported(problem):
            raise ValueError(f"the Mosaic GPU kernels do not support this input: {reason}")
        n, hw, c, dtype = problem.n, problem.hw, problem.c, problem.dtype
        cb = MOSAIC_CHANNELS
        rows = mosaic_rows(hw, problem.itemsize)
        g, t = c // cb, hw // rows
        s = mosaic_split(t, n * g, self.sms)
        ts = t // s
        ops = ArrayOps(dtype) if self.interpret is not None else MosaicOps(dtype, rows)
        tile_outs = _kinds(p, "tile")
        chan_outs = _kinds(p, "channel")
        pix_outs = _kinds(p, "pixel")
        kinds = dict(p.outputs)
        piped_outs = tile_outs if self.tma_stores else []
        tile_bytes = rows * cb * problem.itemsize * (len(p.tiles) + len(piped_outs))
        steps = max(1, min(4, ts, self.smem_bytes // tile_bytes))

        def kernel(*refs):
            refs = list(refs)
            tiles_in = [refs.pop(0) for _ in p.tiles]
            chans_in = [refs.pop(0) for _ in p.channels]
            pix_in = [refs.pop(0) for _ in p.pixels]
            tiles_out = [refs.pop(0) for _ in tile_outs]
            chans_out = [refs.pop(0) for _ in chan_outs]
            pix_out = [refs.pop(0) for _ in pix_outs]
            i, j, k = lax.axis_index("n"), lax.axis_index("g"), lax.axis_index("s")
            cols = pl.ds(j * cb, cb)
            chans = {
                name: ops.load_channels(ref.at[i, cols])
                for name, ref in zip(p.channels, chans_in, strict=True)
            }

            def step(idx, *tile_refs_and_carry):
                refs = list(tile_refs_and_carry)
                carry = refs.pop() if chan_outs else ()
                pixels = pl.ds((k * ts + idx[0]) * rows, rows)
                args = {name: ops.load_tile(refs.pop(0)) for name in p.tiles}
                args |= chans
                for name, ref in zip(p.pixels, pix_in, strict=True):
                    args[name] = ops.load_pixels(ref.at[i, pixels])
                res = p.step(ops, **args)
                for name, ref in zip(tile_outs, tiles_out, strict=True):
                    ops.store(refs.pop(0) if piped_outs else ref.at[i, pixels, cols], res[name])
                for name, ref in zip(pix_outs, pix_out, strict=True):
                    ops.store(ref.at[i, j, pixels], res[name])
                if not chan_outs:
                    return None
                return tuple(
                    _combine(kinds[name], acc, res[name])
                    for name, acc in zip(chan_outs, carry, strict=True)
                )

            spec = pl.BlockSpec((rows, cb), lambda r: (k * ts + r, j))
            init = tuple(ops.fill_channels(INITIAL[kinds[name]], cb) for name in chan_outs)
            pipeline = plgpu.emit_pipeline(
                step,
                grid=(ts,),
                in_specs=[spec] * len(p.tiles),
                out_specs=[spec] * len(piped_outs),
                max_concurrent_steps=steps,
                **({"init_carry": init} if chan_outs else {}),
            )
            piped = [r.at[i] for r in tiles_out] if piped_outs else []
            final = pipeline(*[r.at[i] for r in tiles_in], *piped)
            for acc, ref in zip(final or (), chans_out, strict=True):
                ops.store(ref.at[i, k, cols], acc)

        kernel.__name__ = p.name
        out_type = [jax.ShapeDtypeStruct((n, hw, c), dtype) for _ in tile_outs]
        out_type += [jax.ShapeDtypeStruct((n, s, c), F32) for _ in chan_outs]
        out_type += [jax.ShapeDtypeStruct((n, g, hw), F32) for _ in pix_outs]
        call = plgpu.kernel(
            kernel,
            out_type=tuple(out_type),
            grid=(n, g, s),
            grid_names=("n", "g", "s"),
            interpret=self.interpret,
        )
        args = [inputs[k] for k in p.tiles]
        args += [inputs[k].astype(F32) for k in (*p.channels, *p.pixels)]
        raw = list(call(*args))
        out = {name: raw.pop(0) for name in tile_outs}
        for name in (*chan_outs, *pix_outs):
            out[name] = FOLDS[kinds[name]](raw.pop(0), axis=1)
        return _outputs(p, out)


def _combine(kind: str, acc: jax.Array, value: jax.Array) -> jax.Array:
    return acc + value if kind == "channel_sum" else jnp.maximum(acc, value)
