"""Attention modules alone: SE, CBAM, BAM, PSA forward and forward+backward, NHWC bf16.

Shapes are the four ResNet-50 stage outputs at batch 128. Each module runs in training mode
(BatchNorm on batch statistics). Ours: for CBAM and BAM a row per `spatial_conv` (each
formulation of their spatial convs, layers.tap_convs, then "auto"), for SE and PSA one row.
PyTorch: the reference modules of flax_attention.reference.layers, channels_last, bf16, eager and
torch.compile, when torch sees a CUDA device.

Minimal bytes (the floor, at the copy bandwidth measured in the same run): forward reads x and
writes y; forward+backward reads x, writes y, reads dy, re-reads x and writes dx (5 passes).
PSA is convolution-bound: its rows carry TFLOP/s instead.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from benchmarks.charts import ChartSpec, series
from benchmarks.device import torch_cuda
from benchmarks.results import Results, error_text
from benchmarks.settings import Settings
from benchmarks.timing import (
    copy_bandwidth,
    jax_sync,
    max_rel_error,
    random_inputs,
    time_fn,
    torch_compile,
    torch_sync,
)
from flax_attention import BAM, CBAM, PSA, SE
from flax_attention.layers.tap_convs import FORMULATIONS

SHAPES = ((128, 56, 56, 256), (128, 28, 28, 512), (128, 14, 14, 1024), (128, 7, 7, 2048))
QUICK_SHAPES = ((2, 8, 8, 64), (2, 5, 7, 128))
MODES = ("fwd", "fwdbwd")
PASSES = {"fwd": 2, "fwdbwd": 5}  # full-tensor passes of the minimal-bytes floor
SPATIAL_CONV_ROWS = (*FORMULATIONS, "auto")  # the library conv first: the others' reference

CHART = ChartSpec(
    value="bw_frac",
    label="fraction of copy bandwidth at minimal bytes (PSA: TFLOP/s / 100)",
    group=lambda r: f"{r['name']} {r['mode']} {r['shape'][1]}x{r['shape'][3]}",
    series=series,
)


@dataclass(frozen=True)
class ModuleCase:
    """How to build one module in Flax; PyTorch builders are in `_torch_modules`."""

    flax: Callable[..., nnx.Module]  # (channels, *, rngs, dtype[, spatial_conv]) -> module
    spatial_convs: tuple[str, ...] = ()  # a row per `spatial_conv=`; none: one row
    flops: Callable[[tuple[int, ...]], float] | None = None  # forward FLOPs, conv-bound modules


def _psa_flops(shape: tuple[int, ...], kernels=(3, 5, 7, 9), groups=(1, 4, 8, 16)) -> float:
    n, h, w, c = shape
    split = c // len(kernels)
    return sum(
        2.0 * n * h * w * (c // g) * k * k * split for k, g in zip(kernels, groups, strict=False)
    )


def _torch_modules() -> dict[str, Callable[[int], Any]]:
    from flax_attention.reference import layers as ref

    return {
        "se": lambda c: ref.SELayer(c, c // 16, bias=False),
        "cbam": lambda c: ref.CBAMRef(c, 16),
        "bam": lambda c: ref.BAMRef(c, 16),
        "psa": lambda c: ref.PSARef(c, c),
    }


CASES: dict[str, ModuleCase] = {
    "se": ModuleCase(lambda c, **kw: SE(c, 16, bias=False, **kw)),
    "cbam": ModuleCase(
        lambda c, spatial_conv="auto", **kw: CBAM(c, 16, formulation=spatial_conv, **kw),
        SPATIAL_CONV_ROWS,
    ),
    "bam": ModuleCase(
        lambda c, spatial_conv="auto", **kw: BAM(c, 16, formulation=spatial_conv, **kw),
        SPATIAL_CONV_ROWS,
    ),
    "psa": ModuleCase(lambda c, **kw: PSA(c, c, **kw), flops=_psa_flops),
}


def variants(case: ModuleCase) -> list[dict[str, str]]:
    """The keyword arguments of each of `case`'s rows: one per `spatial_conv`, else one."""
    return [{"spatial_conv": form} for form in case.spatial_convs] or [{}]


def flax_fn(module: nnx.Module, mode: str) -> tuple[Callable, Any]:
    """A jitted pure function of (state, x, dy) for `mode`, and the module state."""
    graphdef, state = nnx.split(module)

    def apply(state, x):
        return nnx.merge(graphdef, state)(x)

    if mode == "fwd":
        return jax.jit(lambda state, x, dy: apply(state, x)), state

    def fwd_bwd(state, x, dy):
        y, vjp = jax.vjp(apply, state, x)
        return y, vjp(dy)

    return jax.jit(fwd_bwd), state


def torch_fn(module, mode: str, torch) -> Callable:
    """`f(x, dy)` running the module forward (no grad) or forward + backward (dx and dparams)."""
    params = [p for p in module.parameters() if p.requires_grad]
    if mode == "fwd":

        def fwd(x, dy):
            with torch.no_grad():
                return module(x)

        return fwd

    def fwd_bwd(x, dy):
        y = module(x)
        return torch.autograd.grad(y, [x, *params], dy)

    return fwd_bwd


def run(
    settings: Settings,
    names: tuple[str, ...] = tuple(CASES),
    frameworks: tuple[str, ...] = ("flax", "torch", "torch.compile"),
) -> Results:
    """Measure every module x shape x mode x framework (ours: x spatial_conv); returns the
    suite's results."""
    res = Results("modules", settings)
    bw = copy_bandwidth(settings)
    res.meta["copy_bandwidth_gbps"] = bw
    print(f"copy bandwidth {bw}", flush=True)
    gbps = bw["gbps"]
    torch = torch_cuda() if {"torch", "torch.compile"} & set(frameworks) else None
    torch_builders = _torch_modules() if torch is not None else {}
    shapes = QUICK_SHAPES if settings.quick else SHAPES
    for name in names:
        case = CASES[name]
        for shape in shapes:
            shape = tuple(shape)
            xs = random_inputs(shape, jnp.bfloat16, settings.inputs, seed=1)
            dys = random_inputs(_out_shape(name, shape), jnp.bfloat16, settings.inputs, seed=2)
            for mode in MODES:
                base = {"name": name, "mode": mode, "shape": list(shape), "batch": shape[0]}
                base["dtype"] = "bfloat16"
                base.update(_floor(case, name, shape, mode, gbps))
                reference = None  # the library conv's outputs, for the other formulations' errors
                for kw in variants(case) if "flax" in frameworks else ():
                    row = {**base, "framework": "flax", **kw}
                    try:
                        module = case.flax(shape[-1], rngs=nnx.Rngs(0), dtype=jnp.bfloat16, **kw)
                        module.train()
                        fn, state = flax_fn(module, mode)
                        inputs = [(state, x, dy) for x, dy in zip(xs, dys, strict=False)]
                        out = fn(*inputs[0])
                        if kw:
                            reference = out if reference is None else reference
                            row["rel_err_vs_conv"] = max_rel_error(out, reference)
                        timing = time_fn(fn, inputs, jax_sync, settings)
                        row.update(timing.as_dict())
                        row.update(_fractions(row))
                    except Exception as e:  # a case that fails to compile is a result too
                        row["error"] = error_text(e)
                    res.add(row)
                if torch is not None:
                    build = torch_builders[name]
                    for row in _torch_rows(torch, build, base, xs, dys, settings, frameworks):
                        res.add(row)
            del xs, dys
    return res


def _out_shape(name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    return shape  # every module here keeps the input shape (PSA: in = out channels, stride 1)


def _floor(case: ModuleCase, name: str, shape, mode: str, gbps: float) -> dict[str, float]:
    n_bytes = PASSES[mode] * 2 * math.prod(shape)
    out = {"min_bytes": n_bytes, "floor_ms": n_bytes / gbps / 1e6}
    if case.flops is not None:
        out["flops"] = case.flops(shape) * (1 if mode == "fwd" else 3)
    return out


def _fractions(row: dict[str, Any]) -> dict[str, float]:
    out = {"bw_frac": round(row["floor_ms"] / row["median_ms"], 4)}
    if "flops" in row:
        out["tflops"] = round(row["flops"] / row["median_ms"] / 1e9, 2)
    return out


def _torch_rows(torch, build, base, xs, dys, settings: Settings, frameworks: tuple[str, ...]):
    """The eager / torch.compile rows of `frameworks` for one case (NCHW tensors in
    channels_last, bf16)."""

    def to_torch(a, grad):  # NHWC on the device is NCHW in channels_last: a view, then a copy
        t = torch.from_dlpack(a).permute(0, 3, 1, 2)
        return t.clone(memory_format=torch.channels_last).requires_grad_(grad)

    grad = base["mode"] == "fwdbwd"
    inputs = [(to_torch(x, grad), to_torch(dy, False)) for x, dy in zip(xs, dys, strict=False)]
    torch.manual_seed(0)
    module = build(base["shape"][-1]).to("cuda", torch.bfloat16)
    module = module.to(memory_format=torch.channels_last).train()
    wraps = {"torch": lambda m: m, "torch.compile": torch_compile}
    for framework in (f for f in wraps if f in frameworks):
        row = {**base, "framework": framework}
        try:
            fn = torch_fn(wraps[framework](module), base["mode"], torch)
            row.update(time_fn(fn, inputs, torch_sync, settings).as_dict())
            row.update(_fractions(row))
        except Exception as e:
            row["error"] = error_text(e)
        yield row
