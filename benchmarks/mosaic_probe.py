"""Probe which Pallas Mosaic GPU formulations of our gate kernels lower, are right, and are fast.

Kernels, on x = an NHWC tensor viewed as (N, HW, C) in bf16:
  channel_pool  per (n, c): sum over HW (float32) and max over HW  -> two (N, C) float32
  apply_gate    y[n, hw, c] = bf16(x[n, hw, c] * g[n, c]), g (N, C) float32
  gate_grad     per (n, c): sum over HW of dy * x (float32)        -> (N, C) float32

Each (kernel, variant, shape) runs in its own try/except: a failure is a row with its stage
(build, tile, lower, compile, run, check, time), the exception head and the innermost frames.
Variants (VARIANTS) combine an entry point, `pl.pallas_call` + plgpu.CompilerParams (in jax
0.11.2 no lowering rule is registered for it) or `plgpu.kernel` +
`plgpu.emit_pipeline` (TMA tiles; one tile per thread block, a pipelined HW axis, or register
accumulators carried across tiles), with a register layout: plain `ref[...]` (Lane or Warpgroup
semantics, layouts inferred), Layout.WGMMA, or COLS, a Layout.TILED whose warps and lanes split
the channels so a reduction over rows stays inside each thread. `xla` is the jax.numpy baseline.
Times are per call (median, p10, p90 over ~30 samples rotating over 3 input sets, compile
excluded); `bw_frac` is (minimal bytes / time) / (bandwidth of a 1 GiB bf16 `x + 1`).

Run (H100, about a minute):  python -m benchmarks.mosaic_probe [--out DIR] [--only SUBSTR,...]
CPU smoke test:              python -m benchmarks.mosaic_probe --quick --out /tmp/probe
Lower for CUDA without a GPU (needs jax[cuda12] installed): ... --lower-only
Writes DIR/mosaic_probe.json after every row.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import os
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from benchmarks.common import (
    ROOT,
    Settings,
    device_name,
    jax_sync,
    random_inputs,
    time_fn,
    versions,
)

PLGPU_ERROR = ""
try:  # The Mosaic GPU module imports on CPU too; its lowering needs the CUDA plugin.
    from jax.experimental.pallas import mosaic_gpu as plgpu
except ImportError as e:  # pragma: no cover - only on very old or broken installs
    plgpu = None
    PLGPU_ERROR = f"{type(e).__name__}: {e}"

F32, BF16 = jnp.float32, jnp.bfloat16
CB = 256  # channels per block (the COLS layout spans 256 channels)
SHAPES = [(128, 3136, 256), (128, 196, 1024)]  # ResNet-50 stage 1 and stage 3
QUICK_SHAPES = [(2, 256, 256), (2, 196, 512)]
HANG_S = (
    90.0  # a row running longer than this is taken as hung: the worker exits, a new one resumes
)
MAX_RESTARTS = 4


class NoTile(ValueError):
    """The shape has no block that the variant's layout can take (not a Mosaic failure)."""


@dataclasses.dataclass(frozen=True)
class Problem:
    n: int
    hw: int
    c: int
    sms: int = 132
    optimized: bool = True  # plgpu.load(optimized=...) for SMEM loads in a TILED layout


# ---------------------------------------------------------------------------------------------
# Register layouts and tiles


def wgmma_layout():
    """plgpu.Layout.WGMMA: (64, 8) tiles, warps split the rows, so a reduction over rows
    goes across warps through SMEM scratch (CompilerParams.reduction_scratch_bytes)."""
    return plgpu.Layout.WGMMA


def cols_layout():
    """Layout.TILED(Tiling(((1, 256), (64,), (2,))), warps (-3,), lanes (-2,), vector -1):
    row r of a (rows, 256) tile is split over 4 warps x 32 lanes x 2 adjacent channels, so the
    reduction over rows is in-thread and the reduced layout has no replication. Needs
    `Layout.TILED` and `plgpu.Tiling` (both in jax 0.10.2; not in some older versions)."""
    tiling = plgpu.Tiling(((1, CB), (64,), (2,)))
    return plgpu.Layout.TILED(tiling, warp_dims=(-3,), lane_dims=(-2,), vector_dim=-1)


def channel_block(c: int) -> int:
    if c % CB:
        raise NoTile(f"C={c} is not a multiple of {CB}")
    return CB


def pick_rows(hw: int, cols: int, multiple: int, max_bytes: int) -> int:
    """Largest multiple of `multiple` dividing `hw` whose bf16 (rows, cols) tile fits."""
    legal = [r for r in range(multiple, hw + 1, multiple) if hw % r == 0]
    legal = [r for r in legal if r * cols * 2 <= max_bytes]
    if not legal:
        raise NoTile(f"no multiple of {multiple} divides HW={hw} within {max_bytes} B")
    return max(legal)


def pick_split(t: int, ctas: int, sms: int) -> int:
    """Smallest divisor s of `t` giving ctas * s >= 2 * sms thread blocks (else t)."""
    return next((s for s in range(1, t + 1) if t % s == 0 and ctas * s >= 2 * sms), t)


def mload(ref, layout, optimized: bool) -> jax.Array:
    """plgpu.load of a whole (already indexed) ref in `layout`. jax 0.10 requires the `idx`
    argument; jax 0.11 makes it optional and deprecates it in favour of `ref.at[idx]`."""
    idx = inspect.signature(plgpu.load).parameters["idx"]
    args = ((),) if idx.default is inspect.Parameter.empty else ()
    return plgpu.load(ref, *args, layout=layout, optimized=optimized)


def load_f32(ref, layout, optimized: bool) -> jax.Array:
    """`ref` (SMEM or GMEM) as float32 in `layout` (None: plain `ref[...]`, default layout)."""
    if layout is None:
        return ref[...].astype(F32)
    return mload(ref, layout, optimized).astype(F32)


def lane_params() -> Any:
    return plgpu.CompilerParams()


def wg_params() -> Any:
    """Warpgroup lowering semantics (layouts inferred by Mosaic GPU). The enum is
    plgpu.LoweringSemantics in jax 0.10+ (ThreadSemantics before); the CompilerParams field is
    lowering_semantics (thread_semantics before)."""
    enum = getattr(plgpu, "LoweringSemantics", None) or plgpu.ThreadSemantics
    fields = {f.name for f in dataclasses.fields(plgpu.CompilerParams)}
    key = "lowering_semantics" if "lowering_semantics" in fields else "thread_semantics"
    return plgpu.CompilerParams(**{key: enum.Warpgroup})


# ---------------------------------------------------------------------------------------------
# Kernel bodies (refs are 2D (rows, cb) tiles and 1D (cb,) vectors)


def pool_body(layout, optimized: bool) -> Callable:
    def channel_pool_kernel(x_ref, s_ref, m_ref):
        x = load_f32(x_ref, layout, optimized)
        s_ref[...] = jnp.sum(x, axis=0)
        m_ref[...] = jnp.max(x, axis=0)

    return channel_pool_kernel


def gate_body(layout, optimized: bool) -> Callable:
    def apply_gate_kernel(x_ref, g_ref, y_ref):
        x = load_f32(x_ref, layout, optimized)
        if layout is None:
            g = g_ref[...][None, :]
        else:
            g = mload(g_ref, layout.reduce(0), optimized)
            g = plgpu.layout_cast(lax.broadcast_in_dim(g, x.shape, (1,)), layout)
        y_ref[...] = (x * g).astype(y_ref.dtype)

    return apply_gate_kernel


def grad_body(layout, optimized: bool) -> Callable:
    def gate_grad_kernel(x_ref, dy_ref, d_ref):
        x, dy = load_f32(x_ref, layout, optimized), load_f32(dy_ref, layout, optimized)
        d_ref[...] = jnp.sum(x * dy, axis=0)

    return gate_grad_kernel


# ---------------------------------------------------------------------------------------------
# Grid formulations: grid (N, G, T) over (rows, cb) tiles, G = C / cb, T = HW / rows; reductions
# write one (cb,) float32 partial per tile into (N, T, C), which XLA folds. Two entry points run
# the same bodies and BlockSpecs:
#   "pallas_call": pl.pallas_call(..., compiler_params=plgpu.CompilerParams(...)). In jax 0.11.2
#     pallas_call.py's gpu_lowering finds no lowering rule registered for plgpu.CompilerParams
#     (`assert rule is not None`): the AssertionError every pallas_call formulation hits.
#   "kernel": the same grid rebuilt from public pieces, as jax 0.11's testing shim
#     jax/_src/pallas/mosaic_gpu/pallas_call.py does: plgpu.kernel over the parallel grid axes
#     and plgpu.emit_pipeline (TMA GMEM<->SMEM copies) over the trailing sequential ones
#     (grid=() when all are parallel: one step, one tile per thread block).


@dataclasses.dataclass(frozen=True)
class GridPlan:
    rows: int
    cb: int
    t: int
    g: int

    @classmethod
    def make(cls, p: Problem, multiple: int, max_bytes: int) -> GridPlan:
        cb = channel_block(p.c)
        rows = pick_rows(p.hw, cb, multiple, max_bytes)
        return cls(rows, cb, p.hw // rows, p.c // cb)

    def tile(self) -> pl.BlockSpec:
        return pl.BlockSpec((None, self.rows, self.cb), lambda n, j, i: (n, i, j))

    def part(self) -> pl.BlockSpec:
        return pl.BlockSpec((None, None, self.cb), lambda n, j, i: (n, i, j))

    def vec(self) -> pl.BlockSpec:
        return pl.BlockSpec((None, self.cb), lambda n, j, i: (n, j))


def kernel_grid(body, grid, ins, outs, params, seq: int, steps: int) -> Callable:
    """plgpu.kernel over grid[:-seq] (or all of it), emit_pipeline over the last `seq` axes."""
    par, sq = grid[: len(grid) - seq], grid[len(grid) - seq :]
    names = tuple(f"d{i}" for i in range(len(par)))

    def respec(spec: pl.BlockSpec, ids) -> pl.BlockSpec:
        return pl.BlockSpec(spec.block_shape, lambda *t: spec.index_map(*ids, *t))

    def grid_kernel(*refs):
        ids = [lax.axis_index(a) for a in names]
        plgpu.emit_pipeline(
            lambda _, *tiles: body(*tiles),
            grid=sq,
            in_specs=[respec(s, ids) for s in ins],
            out_specs=[respec(s, ids) for s, _ in outs],
            max_concurrent_steps=steps,
        )(*refs)

    grid_kernel.__name__ = body.__name__
    return plgpu.kernel(
        grid_kernel,
        out_type=tuple(shape for _, shape in outs),
        grid=par,
        grid_names=names,
        compiler_params=params,
    )


def grid_call(p: Problem, plan: GridPlan, body, ins, outs, entry: str, params_fn) -> Callable:
    """`entry` "pallas_call", "kernel" (all axes parallel) or "kernel_seqK" (T sequential,
    pipelined K deep)."""
    grid = (p.n, plan.g, plan.t)
    if entry == "pallas_call":
        return pl.pallas_call(
            body,
            grid=grid,
            in_specs=ins,
            out_specs=[spec for spec, _ in outs],
            out_shape=[shape for _, shape in outs],
            compiler_params=params_fn(),
        )
    steps = int(entry.removeprefix("kernel_seq")) if entry.startswith("kernel_seq") else 1
    return kernel_grid(body, grid, ins, outs, params_fn(), int(steps > 1), steps)


def pool_grid(p: Problem, entry: str, layout_fn, multiple: int, params_fn=None, max_bytes=32768):
    layout = layout_fn() if layout_fn else None
    plan = GridPlan.make(p, multiple, max_bytes)
    part = (plan.part(), jax.ShapeDtypeStruct((p.n, plan.t, p.c), F32))
    body = pool_body(layout, p.optimized)
    f = grid_call(p, plan, body, [plan.tile()], [part, part], entry, params_fn or lane_params)

    def channel_pool(x):
        s, m = f(x)
        return s.sum(1), m.max(1)

    return channel_pool


def gate_grid(p: Problem, entry: str, layout_fn, multiple: int, params_fn=None, max_bytes=32768):
    layout = layout_fn() if layout_fn else None
    plan = GridPlan.make(p, multiple, max_bytes)
    out = (plan.tile(), jax.ShapeDtypeStruct((p.n, p.hw, p.c), BF16))
    ins = [plan.tile(), plan.vec()]
    body = gate_body(layout, p.optimized)
    f = grid_call(p, plan, body, ins, [out], entry, params_fn or lane_params)
    return lambda x, g: f(x, g)[0]


def grad_grid(p: Problem, entry: str, layout_fn, multiple: int, params_fn=None, max_bytes=16384):
    layout = layout_fn() if layout_fn else None
    plan = GridPlan.make(p, multiple, max_bytes)
    part = (plan.part(), jax.ShapeDtypeStruct((p.n, plan.t, p.c), F32))
    ins = [plan.tile(), plan.tile()]
    body = grad_body(layout, p.optimized)
    f = grid_call(p, plan, body, ins, [part], entry, params_fn or lane_params)
    return lambda x, dy: f(x, dy)[0].sum(1)


def pool_transposed(p: Problem):
    """Input pre-transposed to (N, C, HW): WGMMA tiles (64 channels, cols pixels) reduced over
    axis 1 (the row reduction of attention kernels, Layout.WGMMA.reduce(1))."""
    layout, cb = wgmma_layout(), 64
    if p.c % cb:
        raise NoTile(f"C={p.c} is not a multiple of {cb}")
    cols = pick_rows(p.hw, cb, 8, 32768)
    t, g = p.hw // cols, p.c // cb

    def channel_pool_t_kernel(x_ref, s_ref, m_ref):
        x = load_f32(x_ref, layout, p.optimized)
        s_ref[...] = jnp.sum(x, axis=1)
        m_ref[...] = jnp.max(x, axis=1)

    tile = pl.BlockSpec((None, cb, cols), lambda n, j, i: (n, j, i))
    part = pl.BlockSpec((None, None, cb), lambda n, j, i: (n, i, j))
    out = (part, jax.ShapeDtypeStruct((p.n, t, p.c), F32))
    f = kernel_grid(channel_pool_t_kernel, (p.n, g, t), [tile], [out, out], lane_params(), 0, 1)

    def channel_pool(xt):
        s, m = f(xt)
        return s.sum(1), m.max(1)

    return channel_pool


# ---------------------------------------------------------------------------------------------
# plgpu.kernel formulations: grid (N, G, S) thread blocks, each one runs plgpu.emit_pipeline over
# its T / S row tiles (TMA copies `steps` deep) and keeps per-channel accumulators in registers
# (emit_pipeline's init_carry); results are stored from registers straight to GMEM.


@dataclasses.dataclass(frozen=True)
class KernelPlan:
    rows: int
    cb: int
    g: int
    s: int
    ts: int

    @classmethod
    def make(cls, p: Problem, max_bytes: int) -> KernelPlan:
        cb = channel_block(p.c)
        rows = pick_rows(p.hw, cb, 1, max_bytes)
        t, g = p.hw // rows, p.c // cb
        s = pick_split(t, p.n * g, p.sms)
        return cls(rows, cb, g, s, t // s)

    def ids(self) -> tuple[jax.Array, jax.Array, jax.Array]:
        return lax.axis_index("n"), lax.axis_index("g"), lax.axis_index("s")

    def spec(self, j, k) -> pl.BlockSpec:
        return pl.BlockSpec((self.rows, self.cb), lambda i: (k * self.ts + i, j))


def split_kernel(p: Problem, plan: KernelPlan, body: Callable, out_type) -> Callable:
    return plgpu.kernel(
        body,
        out_type=out_type,
        grid=(p.n, plan.g, plan.s),
        grid_names=("n", "g", "s"),
        compiler_params=lane_params(),
    )


def fill(value: float, cb: int, layout) -> jax.Array:
    return plgpu.layout_cast(jnp.full((cb,), value, F32), layout)


def pool_kernel(p: Problem, steps: int = 4):
    """4 x 16 KiB tiles in flight per thread block."""
    layout = cols_layout()
    red, plan = layout.reduce(0), KernelPlan.make(p, 16384)

    def channel_pool_kernel(x_gmem, s_gmem, m_gmem):
        n, j, k = plan.ids()

        def step(_, x_smem, carry):
            x = load_f32(x_smem, layout, p.optimized)
            return carry[0] + jnp.sum(x, axis=0), jnp.maximum(carry[1], jnp.max(x, axis=0))

        init = (fill(0.0, plan.cb, red), fill(-jnp.inf, plan.cb, red))
        pipe = plgpu.emit_pipeline(
            step,
            grid=(plan.ts,),
            in_specs=[plan.spec(j, k)],
            max_concurrent_steps=steps,
            init_carry=init,
        )
        s, m = pipe(x_gmem.at[n])
        cols = pl.ds(j * plan.cb, plan.cb)
        s_gmem[n, k, cols] = s
        m_gmem[n, k, cols] = m

    out = jax.ShapeDtypeStruct((p.n, plan.s, p.c), F32)
    f = split_kernel(p, plan, channel_pool_kernel, (out, out))

    def channel_pool(x):
        s, m = f(x)
        return s.sum(1), m.max(1)

    return channel_pool


def gate_kernel(p: Problem, steps: int = 4):
    """4 x (8 KiB x tile + 8 KiB y tile) in flight per thread block."""
    layout = cols_layout()
    red, plan = layout.reduce(0), KernelPlan.make(p, 8192)

    def apply_gate_kernel(x_gmem, g_gmem, y_gmem):
        n, j, k = plan.ids()
        cols = pl.ds(j * plan.cb, plan.cb)
        g = mload(g_gmem.at[n, cols], red, optimized=False)

        def step(_, x_smem, y_smem):
            x = load_f32(x_smem, layout, p.optimized)
            gb = plgpu.layout_cast(lax.broadcast_in_dim(g, x.shape, (1,)), layout)
            y_smem[...] = (x * gb).astype(y_smem.dtype)

        spec = plan.spec(j, k)
        pipe = plgpu.emit_pipeline(
            step, grid=(plan.ts,), in_specs=[spec], out_specs=[spec], max_concurrent_steps=steps
        )
        pipe(x_gmem.at[n], y_gmem.at[n])

    out = jax.ShapeDtypeStruct((p.n, p.hw, p.c), BF16)
    return split_kernel(p, plan, apply_gate_kernel, out)


def grad_kernel(p: Problem, steps: int = 4):
    """4 x (8 KiB x tile + 8 KiB dy tile) in flight per thread block."""
    layout = cols_layout()
    red, plan = layout.reduce(0), KernelPlan.make(p, 8192)

    def gate_grad_kernel(x_gmem, dy_gmem, d_gmem):
        n, j, k = plan.ids()

        def step(_, x_smem, dy_smem, acc):
            x, dy = load_f32(x_smem, layout, p.optimized), load_f32(dy_smem, layout, p.optimized)
            return acc + jnp.sum(x * dy, axis=0)

        spec = plan.spec(j, k)
        pipe = plgpu.emit_pipeline(
            step,
            grid=(plan.ts,),
            in_specs=[spec, spec],
            max_concurrent_steps=steps,
            init_carry=fill(0.0, plan.cb, red),
        )
        d_gmem[n, k, pl.ds(j * plan.cb, plan.cb)] = pipe(x_gmem.at[n], dy_gmem.at[n])

    f = split_kernel(p, plan, gate_grad_kernel, jax.ShapeDtypeStruct((p.n, plan.s, p.c), F32))
    return lambda x, dy: f(x, dy).sum(1)


# ---------------------------------------------------------------------------------------------
# XLA baselines (also the float32 references)


def pool_xla(x):
    return jnp.sum(x.astype(F32), axis=1), jnp.max(x, axis=1).astype(F32)


def gate_xla(x, g):
    return (x.astype(F32) * g[:, None, :]).astype(x.dtype)


def grad_xla(x, dy):
    return jnp.sum(x.astype(F32) * dy.astype(F32), axis=1)


# ---------------------------------------------------------------------------------------------
# Registry: (kernel, variant) -> Variant


@dataclasses.dataclass(frozen=True)
class Variant:
    build: Callable[[Problem], Callable]
    api: str  # the API it relies on, for the report
    prep: Callable | None = None  # maps the standard inputs to this variant's inputs (untimed)
    mosaic: bool = True  # False for the XLA baseline (no Mosaic GPU needed)
    retry_unoptimized: bool = False  # lowering failed: retry with plgpu.load(optimized=False)


WG, COLS, WGMMA = wg_params, cols_layout, wgmma_layout
VARIANTS: dict[tuple[str, str], Variant] = {
    ("channel_pool", "xla"): Variant(lambda p: pool_xla, "jax.numpy", mosaic=False),
    ("channel_pool", "call_cols"): Variant(
        lambda p: pool_grid(p, "pallas_call", COLS, 1),
        "pl.pallas_call grid (N,G,T), 2D (rows,256) blocks, CompilerParams(), TILED cols",
    ),
    ("channel_pool", "grid_strided"): Variant(
        lambda p: pool_grid(p, "kernel", None, 1),
        "plgpu.kernel grid (N,G,T) + emit_pipeline(grid=()), ref[...] (WG_STRIDED) sum(axis=0)",
    ),
    ("channel_pool", "grid_wg"): Variant(
        lambda p: pool_grid(p, "kernel", None, 1, WG),
        "as grid_strided, CompilerParams(lowering_semantics=LoweringSemantics.Warpgroup)",
    ),
    ("channel_pool", "grid_wg_cols"): Variant(
        lambda p: pool_grid(p, "kernel", COLS, 1, WG),
        "as grid_cols (plgpu.load(layout=TILED cols)), Warpgroup semantics",
        retry_unoptimized=True,
    ),
    ("channel_pool", "grid_wgmma"): Variant(
        lambda p: pool_grid(p, "kernel", WGMMA, 64),
        "plgpu.kernel grid + plgpu.load(layout=Layout.WGMMA), cross-warp sum(axis=0)",
        retry_unoptimized=True,
    ),
    ("channel_pool", "grid_cols"): Variant(
        lambda p: pool_grid(p, "kernel", COLS, 1),
        "plgpu.kernel grid + plgpu.load(layout=Layout.TILED cols), in-thread sum(axis=0)",
        retry_unoptimized=True,
    ),
    ("channel_pool", "grid_cols_seq3"): Variant(
        lambda p: pool_grid(p, "kernel_seq3", COLS, 1),
        "plgpu.kernel grid (N,G) + emit_pipeline over T (max_concurrent_steps=3), TILED cols",
        retry_unoptimized=True,
    ),
    ("channel_pool", "carry_cols"): Variant(
        pool_kernel,
        "plgpu.kernel grid (N,G,S) + emit_pipeline(init_carry, 4 steps), TILED cols",
        retry_unoptimized=True,
    ),
    ("channel_pool", "grid_transposed"): Variant(
        pool_transposed,
        "plgpu.kernel grid on (N,C,HW) (pre-transposed, untimed), WGMMA sum(axis=1)",
        prep=lambda x: (jnp.swapaxes(x, 1, 2),),
        retry_unoptimized=True,
    ),
    ("apply_gate", "xla"): Variant(lambda p: gate_xla, "jax.numpy", mosaic=False),
    ("apply_gate", "grid_wg"): Variant(
        lambda p: gate_grid(p, "kernel", None, 1, WG),
        "plgpu.kernel grid, ref[...] * g[None], Warpgroup semantics",
    ),
    ("apply_gate", "grid_cols"): Variant(
        lambda p: gate_grid(p, "kernel", COLS, 1),
        "plgpu.kernel grid, TILED cols, broadcast_in_dim + layout_cast",
        retry_unoptimized=True,
    ),
    ("apply_gate", "pipe_cols"): Variant(
        gate_kernel,
        "plgpu.kernel grid (N,G,S) + emit_pipeline(in/out specs, 4 steps), TILED cols",
        retry_unoptimized=True,
    ),
    ("gate_grad", "xla"): Variant(lambda p: grad_xla, "jax.numpy", mosaic=False),
    ("gate_grad", "grid_cols"): Variant(
        lambda p: grad_grid(p, "kernel", COLS, 1),
        "plgpu.kernel grid, TILED cols, partials (N,T,C)",
        retry_unoptimized=True,
    ),
    ("gate_grad", "carry_cols"): Variant(
        grad_kernel,
        "plgpu.kernel grid (N,G,S) + emit_pipeline(init_carry, 4 steps), TILED cols",
        retry_unoptimized=True,
    ),
}

# Per kernel: which input sets it takes, and the tensor-sized arrays it must move (bytes).
INPUTS = {"channel_pool": ("x",), "apply_gate": ("x", "g"), "gate_grad": ("x", "dy")}
TENSORS_MOVED = {"channel_pool": 1, "apply_gate": 2, "gate_grad": 2}


# ---------------------------------------------------------------------------------------------
# Correctness


def abs_sum_ref(x, dy=None) -> jax.Array:
    v = x.astype(F32) if dy is None else x.astype(F32) * dy.astype(F32)
    return jnp.sum(jnp.abs(v), axis=1)


@jax.jit
def _sum_err(out, ref, scale):
    err = jnp.abs(out.astype(F32) - ref)
    return jnp.max(err), jnp.max(err / (scale + 1e-30))


@jax.jit
def _ulp_err(y, ref):
    a = lax.bitcast_convert_type(y.astype(BF16), jnp.int16).astype(jnp.int32)
    b = lax.bitcast_convert_type(ref, jnp.int16).astype(jnp.int32)
    return jnp.max(jnp.abs(y.astype(F32) - ref.astype(F32))), jnp.max(jnp.abs(a - b))


def check(kernel: str, out, ref, scale) -> dict[str, Any]:
    """max_abs_err and whether it is within tolerance: sums within 1e-3 of sum(|terms|), max
    exact, apply_gate within 1 bf16 ulp (bit patterns of same-sign values differ by <= 1)."""
    if kernel == "channel_pool":
        s_abs, s_rel = _sum_err(out[0], ref[0], scale)
        m_abs, _ = _sum_err(out[1], ref[1], scale)
        ok = float(s_rel) <= 1e-3 and float(m_abs) == 0.0
        return {"max_abs_err": max(float(s_abs), float(m_abs)), "rel_err": float(s_rel), "ok": ok}
    if kernel == "apply_gate":
        abs_err, ulps = _ulp_err(out, ref)
        return {"max_abs_err": float(abs_err), "max_ulps": int(ulps), "ok": int(ulps) <= 1}
    abs_err, rel = _sum_err(out, ref, scale)
    return {"max_abs_err": float(abs_err), "rel_err": float(rel), "ok": float(rel) <= 1e-3}


# ---------------------------------------------------------------------------------------------
# Running one row


def error_fields(stage: str, e: BaseException) -> dict[str, Any]:
    """Exception type, first message lines, and the innermost frames (file:line function)."""
    msg = "\n".join(str(e).strip().splitlines()[:4])[:600]
    frames = traceback.extract_tb(e.__traceback__)[-4:]
    tail = " <- ".join(
        f"{f.filename.split('site-packages/')[-1]}:{f.lineno} {f.name}" for f in reversed(frames)
    )
    return {"stage": stage, "error": f"{type(e).__name__}: {msg}", "traceback": tail[:900]}


def compile_variant(
    v: Variant, p: Problem, args: tuple, lower_only: bool
) -> tuple[Any, dict[str, Any]]:
    """Build, lower and compile (or, with `lower_only`, only lower for CUDA, which needs no GPU);
    on a failure of a TILED-layout variant, retry once with plgpu.load(optimized=False).
    Returns (compiled or lowered or None, fields for the row)."""
    info: dict[str, Any] = {}
    for problem in (p, dataclasses.replace(p, optimized=False)):
        stage, info["lowered"], info["compiled"] = "build", False, False
        try:
            fn = v.build(problem)
            stage = "lower"
            t0 = time.perf_counter()
            if lower_only:
                lowered = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
                info["lowered"], info["lower_s"] = True, round(time.perf_counter() - t0, 2)
                return lowered, info
            lowered = jax.jit(fn).lower(*args)
            info["lowered"], stage = True, "compile"
            compiled = lowered.compile()
            info["compiled"], info["compile_s"] = True, round(time.perf_counter() - t0, 2)
            if not problem.optimized:
                info["note"] = "plgpu.load(optimized=True) failed; ran with optimized=False"
            return compiled, info
        except NoTile as e:
            return None, {**info, **error_fields("tile", e)}
        except Exception as e:
            fields = error_fields(stage, e)
            if not (v.retry_unoptimized and problem.optimized):
                return None, {**info, **fields}
            info["first_error"] = fields["error"]
    raise AssertionError("unreachable")


def run_row(
    kernel: str, name: str, p: Problem, data: dict, settings: Settings, copy_gbps: float | None
) -> dict:
    """One row; copy_gbps None means --lower-only."""
    lower_only = copy_gbps is None
    v = VARIANTS[(kernel, name)]
    shape = (p.n, p.hw, p.c)
    row: dict[str, Any] = {"kernel": kernel, "variant": name, "shape": list(shape), "api": v.api}
    row.update(lowered=False, error=None, max_abs_err=None, median_ms=None, p10_ms=None)
    row.update(p90_ms=None, gbps=None, bw_frac=None)
    if v.mosaic and plgpu is None:
        return {**row, "stage": "import", "error": PLGPU_ERROR}
    sets = [tuple(data[k][i] for k in INPUTS[kernel]) for i in range(settings.inputs)]
    if v.prep is not None:
        prep = partial(jax.eval_shape, v.prep) if lower_only else v.prep
        sets = [prep(*s) for s in sets]
        row["note"] = "input prepared outside the timed call"
    compiled, info = compile_variant(v, p, sets[0], lower_only)
    row.update(info)
    if compiled is None or lower_only:
        return row
    stage = "run"
    try:
        out = compiled(*sets[0])
        jax.block_until_ready(out)
        stage = "check"
        row.update(check(kernel, out, data["ref"][kernel], data["scale"].get(kernel)))
        del out
        stage = "time"
        t = time_fn(compiled, sets, jax_sync, settings)
    except Exception as e:
        return {**row, **error_fields(stage, e)}
    nbytes = TENSORS_MOVED[kernel] * p.n * p.hw * p.c * 2
    gbps = nbytes / t.median_ms / 1e6
    row.update(t.as_dict())
    row.update(gbps=round(gbps, 1), bw_frac=round(gbps / copy_gbps, 3))
    return row


def make_data(shape: tuple[int, int, int], settings: Settings) -> dict:
    n, _, c = shape
    k = settings.inputs
    data = {
        "x": random_inputs(shape, BF16, k, seed=1),
        "dy": random_inputs(shape, BF16, k, seed=2),
        "g": random_inputs((n, c), F32, k, seed=3),
    }
    x, dy, g = data["x"][0], data["dy"][0], data["g"][0]
    data["ref"] = {
        "channel_pool": jax.jit(pool_xla)(x),
        "apply_gate": jax.jit(gate_xla)(x, g),
        "gate_grad": jax.jit(grad_xla)(x, dy),
    }
    data["scale"] = {
        "channel_pool": jax.jit(abs_sum_ref)(x),
        "gate_grad": jax.jit(abs_sum_ref)(x, dy),
    }
    return data


def abstract_data(shape: tuple[int, int, int]) -> dict:
    """Shapes only, for --lower-only."""
    x = jax.ShapeDtypeStruct(shape, BF16)
    return {"x": [x], "dy": [x], "g": [jax.ShapeDtypeStruct((shape[0], shape[2]), F32)]}


def copy_bandwidth(settings: Settings) -> float:
    """GB/s of a jitted `x + 1` over ~1 GiB of bf16 (bytes read + bytes written)."""
    size = 2**20 if settings.quick else 2**29
    xs = random_inputs((size,), BF16, 2, seed=123)
    t = time_fn(jax.jit(lambda x: x + 1), [(x,) for x in xs], jax_sync, settings)
    return 2 * size * 2 / t.median_ms / 1e6


# ---------------------------------------------------------------------------------------------
# Output


def write(path: Path, meta: dict, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**meta, "rows": rows}, indent=1) + "\n")


def status(row: dict) -> str:
    if row.get("error"):
        return f"ERR[{row.get('stage')}] {row['error'].splitlines()[0][:70]}"
    if "ok" not in row:
        return "lowered" if row.get("lowered") else "?"
    return "ok" if row["ok"] else f"WRONG err={row.get('max_abs_err')}"


def table(rows: list[dict]) -> str:
    lines = [f"{'kernel':13s} {'variant':16s} {'shape':15s} {'ms':>8s} {'bw':>5s}  status"]
    for r in rows:
        ms = f"{r['median_ms']:.3f}" if r.get("median_ms") is not None else "-"
        bw = f"{r['bw_frac']:.0%}" if r.get("bw_frac") is not None else "-"
        shape = "x".join(map(str, r["shape"]))
        lines.append(
            f"{r['kernel']:13s} {r['variant']:16s} {shape:15s} {ms:>8s} {bw:>5s}  {status(r)}"
        )
    return "\n".join(lines)


def key(kernel: str, variant: str, shape) -> str:
    return f"{kernel}/{variant}/{'x'.join(map(str, shape))}"


def device_healthy() -> bool:
    """False once the device is unusable (e.g. a sticky CUDA error after a bad kernel)."""
    try:
        jax.block_until_ready(jnp.arange(8) + 1)
        return True
    except Exception:
        return False


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.mosaic_probe",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--quick", action="store_true", help="tiny shapes, few samples (CPU smoke)")
    ap.add_argument("--out", type=Path, default=Path("."), help="folder for mosaic_probe.json")
    ap.add_argument("--only", default="", help="comma-separated substrings of kernel/variant")
    ap.add_argument(
        "--lower-only",
        action="store_true",
        help="only lower each variant for CUDA (no GPU needed: jax[cuda12] installed suffices)",
    )
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--resume", action="store_true", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def supervise(argv: list[str], path: Path) -> int:
    """Run the probe in a child process. When one dies (a hung kernel: the watchdog exits it
    after HANG_S; a crash; a broken device), start another that records the row it died in
    and resumes after it."""
    cmd = [sys.executable, "-m", "benchmarks.mosaic_probe", *argv, "--worker"]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    rc = 1
    for attempt in range(MAX_RESTARTS + 1):
        rc = subprocess.call(cmd + (["--resume"] if attempt else []), env=env)
        if rc == 0:
            break
        print(f"probe worker exited with {rc}; resuming after its last row", flush=True)
    if path.exists():
        print(table(json.loads(path.read_text())["rows"]))
        print(f"wrote {path}")
    return rc


def work(args: argparse.Namespace, path: Path) -> int:
    settings = Settings.make(args.quick, args.out)
    if not args.quick:
        settings.samples, settings.warmup, settings.sample_ms, settings.inputs = 30, 3, 10.0, 3
    if args.lower_only:
        settings.inputs = 1
    only = [s for s in args.only.split(",") if s]
    names = [k for k in VARIANTS if not only or any(s in "/".join(k) for s in only)]
    rows: list[dict] = []
    if args.resume and path.exists():
        doc = json.loads(path.read_text())
        rows = doc["rows"]
        if doc.get("pending") and doc["pending"] not in {r.get("key") for r in rows}:
            kernel, variant, shape = doc["pending"].split("/")
            died = "ProcessDied: the probe process died in this row (hang, crash or device error)"
            rows.append(
                {"key": doc["pending"], "kernel": kernel, "variant": variant, "lowered": False}
                | {"shape": [int(d) for d in shape.split("x")], "stage": "died", "error": died}
            )
    done = {r.get("key") for r in rows}
    device = jax.devices()[0]
    sms = getattr(device, "core_count", None) or 132
    copy_gbps = None if args.lower_only else copy_bandwidth(settings)
    meta = {
        "jax_version": jax.__version__,
        "device": device_name(),
        "platform": device.platform,
        "sms": sms,
        "versions": versions(),
        "quick": args.quick,
        "lower_only": args.lower_only,
        "copy_gbps": copy_gbps and round(copy_gbps, 1),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "argv": sys.argv[1:],
        "pending": None,
    }
    print(f"jax {jax.__version__} on {meta['device']}; copy {copy_gbps} GB/s", flush=True)
    for shape in QUICK_SHAPES if args.quick else SHAPES:
        todo = [(k, v) for k, v in names if key(k, v, shape) not in done]
        if not todo:
            continue
        make = abstract_data if args.lower_only else partial(make_data, settings=settings)
        data = make(shape)
        p = Problem(*shape, sms=sms)
        for kernel, name in todo:
            meta["pending"] = key(kernel, name, shape)
            write(path, meta, rows)
            timer = threading.Timer(HANG_S, hung, args=(meta["pending"],))
            timer.daemon = True
            timer.start()
            row = {
                "key": key(kernel, name, shape),
                **run_row(kernel, name, p, data, settings, copy_gbps),
            }
            timer.cancel()
            rows.append(row)
            meta["pending"] = None
            write(path, meta, rows)
            ms = row.get("median_ms")
            print(f"{kernel}/{name} {shape}: {status(row)} {ms if ms else ''}", flush=True)
            if row.get("stage") in ("run", "check", "time") and not device_healthy():
                print("the device is broken after this row; restarting", flush=True)
                os._exit(4)
        del data
    meta["total_s"] = round(time.perf_counter() - T0, 1)
    write(path, meta, rows)
    return 0


def hung(pending: str) -> None:
    """Watchdog: the row `pending` (already written as pending) ran past HANG_S."""
    print(f"{pending}: still running after {HANG_S:.0f} s; exiting", flush=True)
    os._exit(3)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    path = args.out / "mosaic_probe.json"
    if args.worker:
        return work(args, path)
    return supervise(argv, path)


T0 = time.perf_counter()

if __name__ == "__main__":
    sys.exit(main())
