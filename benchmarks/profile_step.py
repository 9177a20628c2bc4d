"""Where a training step's device time goes: the train suite's step, profiled, by kernel kind.

For each model: build and compile the train suite's step (`benchmarks.train.flax_step`), run a
few steps under `jax.profiler.trace`, read the trace back with `jax.profiler.ProfileData`, and
join each device kernel to its HLO instruction in the compiled module. Every instruction is put
in one category (convolution / matmul library calls, reduction fusions, elementwise fusions,
copies, collectives, other), with its time per step and the bytes its operands and result
occupy, so that memory-bound categories can be read against the copy bandwidth.

`python -m benchmarks.profile_step [--models resnet50,...] [--steps 5] [--quick] [--save-hlo]
[--out DIR]` writes `<out>/profile_step.json` (per model: categories and the 25 costliest
instructions); `<out>` is benchmarks/results/<device> unless given.
"""

from __future__ import annotations

import argparse
import glob
import gzip
import json
import re
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import jax
from jax.profiler import ProfileData

from benchmarks import train
from benchmarks.common import RESULTS, device_slug, error_text

ITEMSIZE = {"bf16": 2, "f16": 2, "f32": 4, "f64": 8, "s32": 4, "u32": 4, "s8": 1, "u8": 1}
ITEMSIZE.update(pred=1, s64=8, u64=8)
SHAPE = re.compile(r"\b(bf16|f16|f32|f64|s32|u32|s8|u8|pred|s64|u64)\[([\d,]*)\]")
INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.*)$")
OPCODE = re.compile(r"\b([a-z][a-z0-9\-]*)\(")
OPERAND = re.compile(r"%([\w.\-]+)")
ATTRIBUTES = re.compile(r", (?:calls|metadata|backend_config|custom_call_target|kind)=")

# (category, predicate over (opcode, text)) in order; the first match wins.
CATEGORIES: list[tuple[str, object]] = [
    ("conv", lambda op, text: "cudnn" in text or op == "convolution"),
    ("matmul", lambda op, text: "gemm" in text or "cublas" in text or op == "dot"),
    ("collective", lambda op, text: op.startswith(("all-", "reduce-scatter", "collective"))),
    ("reduction", lambda op, text: "kind=kInput" in text or op == "reduce"),
    ("elementwise", lambda op, text: "kind=kLoop" in text),
    ("copy", lambda op, text: op in ("copy", "transpose", "copy-start", "dynamic-update-slice")),
]


def shape_bytes(text: str) -> int:
    """Bytes of every array shape written in `text` (the result and the operands)."""
    total = 0
    for dtype, dims in SHAPE.findall(text):
        n = 1
        for d in filter(None, dims.split(",")):
            n *= int(d)
        total += n * ITEMSIZE[dtype]
    return total


def instructions(hlo_text: str) -> dict[str, dict]:
    """HLO instruction name -> {opcode, category, bytes} for every instruction in the module;
    bytes = the result's plus every operand's (each operand counted once per use)."""
    parsed = []
    result_bytes = {}
    for line in hlo_text.splitlines():
        m = INSTRUCTION.match(line)
        if not m:
            continue
        name, rest = m.groups()
        op = OPCODE.search(rest)
        opcode, start = (op.group(1), op.start()) if op else ("?", len(rest))
        result_bytes[name] = shape_bytes(rest[:start])
        operands = OPERAND.findall(ATTRIBUTES.split(rest[start:], maxsplit=1)[0])
        parsed.append((name, opcode, rest, operands))
    table = {}
    for name, opcode, rest, operands in parsed:
        category = next((c for c, pred in CATEGORIES if pred(opcode, rest)), "other")
        size = result_bytes[name] + sum(result_bytes.get(o, 0) for o in operands)
        table[name] = {"opcode": opcode, "category": category, "bytes": size}
    return table


def device_events(trace_dir: str) -> list[tuple[str, float]]:
    """(hlo_op, duration ns) of every kernel on the accelerator's streams; on a CPU-only
    host (smoke runs), of every thunk the CPU runtime tagged with an hlo_op."""
    paths = sorted(glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True))
    if not paths:
        return []
    planes = list(ProfileData.from_file(paths[-1]).planes)
    devices = [p for p in planes if p.name.startswith("/device:")]
    events = []
    for plane in devices or planes:
        for line in plane.lines:
            if devices and not line.name.startswith("Stream"):
                continue
            for e in line.events:
                stats = dict(e.stats)
                if "hlo_op" in stats:
                    events.append((str(stats["hlo_op"]), float(e.duration_ns)))
    return events


def profile(name: str, batch: int, image: int, steps: int, hlo_dir: Path | None) -> dict:
    step = train.flax_step(name, "xla", batch, image, inputs=2)
    for i in range(3):  # warm-up: autotuning and allocations stay out of the trace
        step(*step.data[i % 2])
    jax.block_until_ready(step.state)
    with tempfile.TemporaryDirectory() as trace_dir:
        t0 = time.perf_counter()
        with jax.profiler.trace(trace_dir):
            for i in range(steps):
                loss = step(*step.data[i % 2])
            jax.block_until_ready(loss)
        wall_ms = (time.perf_counter() - t0) * 1e3 / steps
        events = device_events(trace_dir)
    hlo_text = step.compiled.as_text()
    if hlo_dir is not None:
        with gzip.open(hlo_dir / f"{name}.hlo.txt.gz", "wt") as f:
            f.write(hlo_text)
    table = instructions(hlo_text)
    per_op: dict[str, float] = defaultdict(float)
    for op, ns in events:
        per_op[op] += ns / 1e6 / steps
    categories: dict[str, dict] = defaultdict(lambda: {"ms": 0.0, "gb": 0.0, "kernels": 0})
    for op, ms in per_op.items():
        info = table.get(op, {"category": "unmatched", "bytes": 0})
        cat = categories[info["category"]]
        cat["ms"] += ms
        cat["gb"] += info["bytes"] / 1e9
        cat["kernels"] += 1
    for cat in categories.values():
        cat["tb_per_s"] = round(cat["gb"] / cat["ms"], 3) if cat["ms"] else None
        cat["ms"], cat["gb"] = round(cat["ms"], 3), round(cat["gb"], 3)
    top = sorted(per_op.items(), key=lambda kv: -kv[1])[:25]
    device_ms = sum(per_op.values())
    return {
        "name": name,
        "batch": batch,
        "wall_ms_per_step_traced": round(wall_ms, 3),
        "device_ms_per_step": round(device_ms, 3),
        "categories": dict(sorted(categories.items(), key=lambda kv: -kv[1]["ms"])),
        "top": [{"op": op, "ms": round(ms, 4), **table.get(op, {})} for op, ms in top],
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(train.MODELS), help="comma-separated models")
    p.add_argument("--steps", type=int, default=5, help="steps traced per model")
    p.add_argument("--quick", action="store_true", help="tiny shapes (CPU smoke)")
    p.add_argument("--out", type=Path, help="folder for profile_step.json")
    p.add_argument("--save-hlo", action="store_true", help="also write <out>/<model>.hlo.txt.gz")
    args = p.parse_args(argv)
    args.out = args.out or RESULTS / device_slug(args.quick)
    args.out.mkdir(parents=True, exist_ok=True)
    batch = train.QUICK_BATCH if args.quick else train.BATCH
    image = train.QUICK_IMAGE if args.quick else train.IMAGE
    rows = []
    for name in args.models.split(","):
        try:
            row = profile(name, batch, image, args.steps, args.out if args.save_hlo else None)
        except Exception as e:
            row = {"name": name, "error": error_text(e)}
        rows.append(row)
        print(f"{name}: wall {row.get('wall_ms_per_step_traced')} ms/step", flush=True)
        for cat, v in row.get("categories", {}).items():
            print(
                f"  {cat:12s} {v['ms']:8.3f} ms {v['gb']:8.3f} GB {v['tb_per_s']} TB/s", flush=True
            )
    meta = {"device": jax.devices()[0].device_kind, "jax": jax.__version__}
    (args.out / "profile_step.json").write_text(json.dumps({**meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
