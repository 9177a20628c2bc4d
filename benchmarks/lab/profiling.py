"""Device time by kernel for a compiled JAX function: trace calls, join kernels to HLO.

`profile_calls(call, steps, hlo_text)` runs `call(i)` a few times to warm up, times `steps`
calls, traces `steps` more with `jax.profiler.trace`, reads the trace back with
`jax.profiler.ProfileData`, and joins each device kernel to its instruction in the compiled
module's HLO text. Every instruction gets one category (convolution / matmul library calls,
reduction fusions, elementwise fusions, copies, collectives, other), the bytes its operands and
result occupy (so memory-bound kernels can be read against the copy bandwidth), and a short
description of what it computes (a custom call's target, a fusion's kind and fused ops, the
source op that produced it).
"""

from __future__ import annotations

import glob
import re
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from typing import Any

import jax
from jax.profiler import ProfileData

ITEMSIZE = {"bf16": 2, "f16": 2, "f32": 4, "f64": 8, "s32": 4, "u32": 4, "s8": 1, "u8": 1}
ITEMSIZE.update(pred=1, s64=8, u64=8)
SHAPE = re.compile(r"\b(bf16|f16|f32|f64|s32|u32|s8|u8|pred|s64|u64)\[([\d,]*)\]")
INSTRUCTION = re.compile(r"^\s*(ROOT )?%?([\w.\-]+) = (.*)$")
COMPUTATION = re.compile(r"^\s*(?:ENTRY )?%?([\w.\-]+) \(.*\) -> .*\{\s*$")
OPCODE = re.compile(r"\b([a-z][a-z0-9\-]*)\(")
OPERAND = re.compile(r"%([\w.\-]+)")
ATTRIBUTES = re.compile(r", (?:calls|metadata|backend_config|custom_call_target|kind)=")
CALLS = re.compile(r"calls=%?([\w.\-]+)")
KIND = re.compile(r"kind=(k\w+)")
TARGET = re.compile(r'custom_call_target="([^"]+)"')
OP_NAME = re.compile(r'op_name="([^"]+)"')
NOISE = re.compile(r", (?:metadata|backend_config|frontend_attributes)=.*$")
HLO_CHARS = 150
# Ops inside a fusion that say nothing about its work.
PLUMBING = {"parameter", "constant", "bitcast", "tuple", "get-tuple-element"}

# (category, predicate over (opcode, text)) in order; the first match wins.
CATEGORIES: list[tuple[str, Callable[[str, str], bool]]] = [
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


def _describe(opcode: str, rest: str, body: list[tuple[str, bool]]) -> str:
    """What one instruction computes: a custom call's target; a fusion's kind, root op and
    fused ops (`body`: the called computation's (opcode, is_root) pairs); else its opcode."""
    target = TARGET.search(rest)
    if target:
        return target.group(1)
    if not body:
        return opcode
    kind = KIND.search(rest)
    root = next((op for op, is_root in body if is_root), "?")
    ops = Counter(op for op, _ in body if op not in PLUMBING)
    listed = ", ".join(f"{op} x{n}" if n > 1 else op for op, n in ops.most_common())
    return f"{opcode} {kind.group(1) if kind else ''} root={root}: {listed}".replace("  ", " ")


def instructions(hlo_text: str) -> dict[str, dict]:
    """HLO instruction name -> {opcode, category, bytes, what, source, hlo} for every
    instruction in the module. bytes = the result's plus every operand's (each operand counted
    once per use); what = `_describe`; source = the JAX op that produced it (metadata op_name);
    hlo = the instruction's text without metadata, cut to HLO_CHARS characters."""
    parsed = []
    result_bytes: dict[str, int] = {}
    bodies: dict[str, list[tuple[str, bool]]] = defaultdict(list)
    computation = None
    for line in hlo_text.splitlines():
        header = COMPUTATION.match(line)
        if header:
            computation = header.group(1)
            continue
        m = INSTRUCTION.match(line)
        if not m:
            continue
        is_root, name, rest = m.groups()
        op = OPCODE.search(rest)
        opcode, start = (op.group(1), op.start()) if op else ("?", len(rest))
        result_bytes[name] = shape_bytes(rest[:start])
        operands = OPERAND.findall(ATTRIBUTES.split(rest[start:], maxsplit=1)[0])
        parsed.append((name, opcode, rest, operands))
        if computation is not None:
            bodies[computation].append((opcode, bool(is_root)))
    table = {}
    for name, opcode, rest, operands in parsed:
        category = next((c for c, pred in CATEGORIES if pred(opcode, rest)), "other")
        size = result_bytes[name] + sum(result_bytes.get(o, 0) for o in operands)
        called = CALLS.search(rest)
        source = OP_NAME.search(rest)
        table[name] = {
            "opcode": opcode,
            "category": category,
            "bytes": size,
            "what": _describe(opcode, rest, bodies.get(called.group(1), []) if called else []),
            "source": source.group(1) if source else "",
            "hlo": NOISE.sub("", rest)[:HLO_CHARS],
        }
    return table


def device_events(trace_dir: str) -> list[tuple[str, str, float]]:
    """(hlo_op, kernel name, duration ns) of every kernel on the accelerator's streams (a
    kernel without an hlo_op, e.g. a library's memset, under its own name); on a CPU-only
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
                    events.append((str(stats["hlo_op"]), e.name, float(e.duration_ns)))
                elif devices:
                    events.append((e.name, e.name, float(e.duration_ns)))
    return events


def profile_calls(
    call: Callable[[int], Any], steps: int, hlo_text: str, warmup: int = 3
) -> dict[str, Any]:
    """Where the device time of `call(i)` (one call of the compiled module `hlo_text`, on
    input set i) goes.

    Returns per call: `wall_ms` (untraced), `wall_ms_traced`, `device_ms` (sum of kernel
    times), `kernels` (kernel launches), `categories` ({category: ms, gb, kernels (launches),
    tb_per_s}), and `ops`: every instruction that ran, costliest first, each with its ms,
    launches, bytes, category, what/source/hlo (see `instructions`) and kernel names.
    """
    out = None
    for i in range(warmup):  # autotuning and allocations stay out of the trace
        out = call(i)
    jax.block_until_ready(out)
    t0 = time.perf_counter()
    for i in range(steps):
        out = call(i)
    jax.block_until_ready(out)
    wall_ms = (time.perf_counter() - t0) * 1e3 / steps
    with tempfile.TemporaryDirectory() as trace_dir:
        t0 = time.perf_counter()
        with jax.profiler.trace(trace_dir):
            for i in range(steps):
                out = call(i)
            jax.block_until_ready(out)
        wall_traced_ms = (time.perf_counter() - t0) * 1e3 / steps
        events = device_events(trace_dir)
    table = instructions(hlo_text)
    per_op: dict[str, dict] = {}
    for op, kernel, ns in events:
        entry = per_op.setdefault(op, {"ms": 0.0, "launches": 0, "kernel_names": set()})
        entry["ms"] += ns / 1e6 / steps
        entry["launches"] += 1
        entry["kernel_names"].add(kernel[:80])
    unmatched = {"category": "unmatched", "bytes": 0}
    categories: dict[str, dict] = defaultdict(lambda: {"ms": 0.0, "gb": 0.0, "kernels": 0})
    ops = []
    for op, entry in sorted(per_op.items(), key=lambda kv: -kv[1]["ms"]):
        info = table.get(op, unmatched)
        launches = entry["launches"] / steps
        cat = categories[info["category"]]
        cat["ms"] += entry["ms"]
        cat["gb"] += info["bytes"] / 1e9
        cat["kernels"] += launches
        ops.append(
            {
                "op": op,
                "ms": round(entry["ms"], 4),
                "launches": round(launches, 2),
                **info,
                "kernel_names": sorted(entry["kernel_names"])[:3],
            }
        )
    for cat in categories.values():
        cat["tb_per_s"] = round(cat["gb"] / cat["ms"], 3) if cat["ms"] else None
        cat["ms"], cat["gb"], cat["kernels"] = (
            round(cat["ms"], 4),
            round(cat["gb"], 4),
            round(cat["kernels"], 2),
        )
    return {
        "wall_ms": round(wall_ms, 4),
        "wall_ms_traced": round(wall_traced_ms, 4),
        "device_ms": round(sum(e["ms"] for e in per_op.values()), 4),
        "kernels": round(len(events) / steps, 2),
        "categories": dict(sorted(categories.items(), key=lambda kv: -kv[1]["ms"])),
        "ops": ops,
    }
