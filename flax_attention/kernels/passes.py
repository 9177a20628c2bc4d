"""The passes of the fused channel and spatial gates: one read of the tensor each.

A `Pass` is a step over one tile, written in the tile algebra of `tile_ops` and run by any
executor of `executors` (XLA on whole tensors, `pl.pallas_call`, Mosaic GPU). Inputs are named
tiles (N, HW, C), per-channel (N, C) and per-pixel (N, HW) float32 arrays; each output has a
kind: a tile, or a per-channel / per-pixel reduction the executor folds over tiles.

Gates of `y = round(round(x * cg) * sg)`, with cg a function of the H*W pools of x (sum, max) and
sg of the per-pixel [max, mean] over C of y1 = round(x * cg).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

OUTPUT_KINDS = ("tile", "channel_sum", "channel_max", "pixel_sum", "pixel_max")


@dataclass(frozen=True)
class Pass:
    """`step(ops, **inputs) -> {output name: value}` over one tile, and its signature."""

    name: str
    step: Callable[..., dict]
    tiles: tuple[str, ...] = ()
    channels: tuple[str, ...] = ()
    pixels: tuple[str, ...] = ()
    outputs: tuple[tuple[str, str], ...] = ()  # (name, kind in OUTPUT_KINDS)

    def __post_init__(self):
        bad = [kind for _, kind in self.outputs if kind not in OUTPUT_KINDS]
        if bad:
            raise ValueError(f"pass {self.name}: unknown output kinds {bad}")


def _channel_pool(ops, x):
    return {"sum": ops.channel_sum(x), "max": ops.channel_max(x)}


CHANNEL_POOL = Pass(
    "channel_pool",
    _channel_pool,
    tiles=("x",),
    outputs=(("sum", "channel_sum"), ("max", "channel_max")),
)


def _spatial_pool(ops, x, cg):
    y1 = ops.round(x * ops.per_channel(cg))
    return {"max": ops.pixel_max(y1), "sum": ops.pixel_sum(y1)}


SPATIAL_POOL = Pass(
    "spatial_pool",
    _spatial_pool,
    tiles=("x",),
    channels=("cg",),
    outputs=(("max", "pixel_max"), ("sum", "pixel_sum")),
)


def _apply_channel_gate(ops, x, cg):
    return {"y": ops.round(x * ops.per_channel(cg))}


def _apply_both_gates(ops, x, cg, sg):
    return {"y": ops.round(x * ops.per_channel(cg)) * ops.per_pixel(sg)}


APPLY_CHANNEL_GATE = Pass(
    "apply_channel_gate",
    _apply_channel_gate,
    tiles=("x",),
    channels=("cg",),
    outputs=(("y", "tile"),),
)
APPLY_BOTH_GATES = Pass(
    "apply_both_gates",
    _apply_both_gates,
    tiles=("x",),
    channels=("cg",),
    pixels=("sg",),
    outputs=(("y", "tile"),),
)


def _channel_gate_grads(ops, x, dy, chan_max):
    """d cg = sum_HW(dy * x); ties of the H*W max (JAX splits the max's cotangent evenly)."""
    hits = ops.indicator(x == ops.per_channel(chan_max))
    return {"d_cg": ops.channel_sum(dy * x), "ties": ops.channel_sum(hits)}


CHANNEL_GATE_GRADS = Pass(
    "channel_gate_grads",
    _channel_gate_grads,
    tiles=("x", "dy"),
    channels=("chan_max",),
    outputs=(("d_cg", "channel_sum"), ("ties", "channel_sum")),
)


def _both_gates_grads(ops, x, dy, cg, chan_max, sg, pix_max):
    """As `_channel_gate_grads` through sg, plus d sg = sum_C(dy * y1) and the ties of the
    per-pixel max over C."""
    y1 = ops.round(x * ops.per_channel(cg))
    pix_hits = ops.indicator(y1 == ops.per_pixel(pix_max))
    out = _channel_gate_grads(ops, x, dy * ops.per_pixel(sg), chan_max)
    return {**out, "d_sg": ops.pixel_sum(dy * y1), "pix_ties": ops.pixel_sum(pix_hits)}


BOTH_GATES_GRADS = Pass(
    "both_gates_grads",
    _both_gates_grads,
    tiles=("x", "dy"),
    channels=("cg", "chan_max"),
    pixels=("sg", "pix_max"),
    outputs=(
        ("d_cg", "channel_sum"),
        ("ties", "channel_sum"),
        ("d_sg", "pixel_sum"),
        ("pix_ties", "pixel_sum"),
    ),
)


def _descriptor_grad(ops, x, cg, pix_max, d_pix_max, d_pix_sum):
    """dL/dy1 (rows, cb) from the per-pixel descriptor's cotangents: the sum's, and the max's
    already divided by its ties."""
    y1 = ops.round(x * ops.per_channel(cg))
    hits = ops.indicator(y1 == ops.per_pixel(pix_max))
    return ops.per_pixel(d_pix_sum) + hits * ops.per_pixel(d_pix_max)


def _descriptor_grads(ops, x, cg, pix_max, d_pix_max, d_pix_sum):
    dy1 = _descriptor_grad(ops, x, cg, pix_max, d_pix_max, d_pix_sum)
    return {"d_cg": ops.channel_sum(dy1 * x)}


DESCRIPTOR_GRADS = Pass(
    "descriptor_grads",
    _descriptor_grads,
    tiles=("x",),
    channels=("cg",),
    pixels=("pix_max", "d_pix_max", "d_pix_sum"),
    outputs=(("d_cg", "channel_sum"),),
)


def _pool_grad(ops, x, d_sum, chan_max, d_chan_max):
    """Cotangent through the H*W sum and max pools (d_chan_max already divided by ties)."""
    hits = ops.indicator(x == ops.per_channel(chan_max))
    return ops.per_channel(d_sum) + hits * ops.per_channel(d_chan_max)


def _channel_gate_input_grad(ops, x, dy, cg, d_sum, chan_max, d_chan_max):
    dx = dy * ops.per_channel(cg) + _pool_grad(ops, x, d_sum, chan_max, d_chan_max)
    return {"dx": dx}


CHANNEL_GATE_INPUT_GRAD = Pass(
    "channel_gate_input_grad",
    _channel_gate_input_grad,
    tiles=("x", "dy"),
    channels=("cg", "d_sum", "chan_max", "d_chan_max"),
    outputs=(("dx", "tile"),),
)


def _both_gates_input_grad(
    ops, x, dy, cg, d_sum, chan_max, d_chan_max, sg, pix_max, d_pix_max, d_pix_sum
):
    dy1 = dy * ops.per_pixel(sg) + _descriptor_grad(ops, x, cg, pix_max, d_pix_max, d_pix_sum)
    dx = dy1 * ops.per_channel(cg) + _pool_grad(ops, x, d_sum, chan_max, d_chan_max)
    return {"dx": dx}


BOTH_GATES_INPUT_GRAD = Pass(
    "both_gates_input_grad",
    _both_gates_input_grad,
    tiles=("x", "dy"),
    channels=("cg", "d_sum", "chan_max", "d_chan_max"),
    pixels=("sg", "pix_max", "d_pix_max", "d_pix_sum"),
    outputs=(("dx", "tile"),),
)
