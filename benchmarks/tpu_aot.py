"""TPU pods without a TPU: the library's training step compiled ahead of time for TPU slices.

`python -m benchmarks --suites tpu_aot [--models ...] [--generations ...] [--slices ...]` (or
`python -m benchmarks.tpu_aot ...`) needs libtpu (`pip install "jax[tpu]==<the pinned jax>"`)
on any host, a CPU one included. For each model x generation x slice x BatchNorm form it
compiles `flax_attention.training.tpu_topology.compile_train_step` (the `jit` parallel form,
bf16, `--per-chip-batch` images per chip; BatchNorm "exact": statistics over every chip,
"grouped": over groups of `--bn-group-size` chips) for the slice's chips, runs nothing, and
records per entry:
- `ok`, `error` (first line) and `compile_s` (lower + compile, seconds on this host);
- HBM per chip from `compiled.memory_analysis()`: `hbm_bytes` = arguments + temporaries +
  outputs - aliased (donated state: the outputs reuse the arguments' buffers), each part kept,
  against the chip's capacity (`CHIPS`);
- the largest per-chip batch that fits (`--max-batch`): "estimate" compiles a second batch
  (a quarter of the configured one) and extrapolates memory linearly in the batch, the largest
  power of two under the capacity (labelled `max_batch_method`); "bisect" compiles powers of
  two from that estimate until the boundary is found; only on `--max-batch-slices`;
- collectives of the compiled HLO by kind: count (`collectives`, the library's
  `count_collectives`) and bytes of their results (`collective_bytes`);
- `est_img_per_s_per_chip`, an ESTIMATE (a roofline, not a measurement): XLA's cost analysis
  per chip per step, max(flops / peak bf16 FLOP/s, bytes accessed / HBM bandwidth), over the
  per-chip batch; `bound` says which term won.

Resumable and incremental: each finished entry is merged at once into
benchmarks/results/tpu-aot/tpu_aot.json (atomic replace), and a rerun skips the entries the
file holds (`--retry-errors` recompiles those that failed), so a long sweep continues across
sessions. A PNG chart is drawn beside it when matplotlib is importable, and the run ends by
printing the file's rows as markdown tables (docs/tpu.md quotes them).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import math
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from benchmarks.device import device_name, versions
from benchmarks.settings import TPU_AOT_RESULTS

SUITE = "tpu_aot"
GIB = 2**30


@dataclass(frozen=True)
class Chip:
    """One TPU generation's chip: HBM capacity (GiB), peak dense bf16 FLOP/s and HBM
    bandwidth (bytes/s), and the topology of each slice size."""

    hbm_gib: float
    peak_bf16_flops: float
    hbm_bytes_per_s: float
    slices: dict[str, str]


# Per chip, from Google Cloud's TPU system architecture pages (cloud.google.com/tpu/docs/v4,
# /v5e, /v5p, /v6e): v4 32 GiB HBM2, 275 TFLOP/s bf16, 1,200 GB/s; v5e 16 GiB, 197 TFLOP/s,
# 819 GB/s; v5p 95 GiB, 459 TFLOP/s, 2,765 GB/s; v6e (Trillium) 32 GiB, 918 TFLOP/s, 1,640
# GB/s. Slices: "host" is 4 chips (one host of every generation holds at least 4), "64" and
# "256" the slice of that many chips.
CHIPS: dict[str, Chip] = {
    "v4": Chip(32, 275e12, 1200e9, {"host": "v4:2x2x1", "64": "v4:4x4x4", "256": "v4:4x8x8"}),
    "v5e": Chip(16, 197e12, 819e9, {"host": "v5e:2x2", "64": "v5e:8x8", "256": "v5e:16x16"}),
    "v5p": Chip(95, 459e12, 2765e9, {"host": "v5p:2x2x1", "64": "v5p:4x4x4", "256": "v5p:4x8x8"}),
    "v6e": Chip(32, 918e12, 1640e9, {"host": "v6e:2x2", "64": "v6e:8x8", "256": "v6e:16x16"}),
}
SLICES = ("host", "64", "256")
BN_FORMS = ("exact", "grouped")

_ARRAY = re.compile(r"\b([a-z]+[0-9a-z]*)\[([\d,]*)\]")
_RESULT = re.compile(
    r"=\s(.+?)\s(all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)(?:-done)?\("
)
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4}
_BYTES |= {"u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}


def collective_bytes(hlo_text: str) -> dict[str, int]:
    """Bytes of the results of the collectives in an HLO module's text, by kind, plus "total"
    (an asynchronous pair counts once, by its `-done`'s result; all-reduce's result is its
    operand's size, all-gather's the gathered array)."""
    out: dict[str, int] = {}
    for match in _RESULT.finditer(hlo_text):
        size = sum(_array_bytes(dtype, dims) for dtype, dims in _ARRAY.findall(match[1]))
        out[match[2]] = out.get(match[2], 0) + size
    return {**dict(sorted(out.items())), "total": sum(out.values())}


def _array_bytes(dtype: str, dims: str) -> int:
    width = 1 if dtype.startswith("f8") else _BYTES[dtype]
    return width * math.prod(int(d) for d in dims.split(",") if d)


@dataclass(frozen=True)
class Entry:
    """One compile of the sweep: `model` on `generation`'s `slice`, BatchNorm `bn` ("exact" or
    "grouped" over `bn_group_size` chips), `per_chip_batch` images of `image_size`^2."""

    model: str
    generation: str
    slice: str
    bn: str
    bn_group_size: int
    per_chip_batch: int
    image_size: int
    precision: str

    @property
    def key(self) -> str:
        group = f"{self.bn}{self.bn_group_size if self.bn == 'grouped' else ''}"
        parts = (self.model, self.generation, self.slice, group, self.per_chip_batch)
        return "|".join(map(str, (*parts, self.image_size, self.precision)))

    @property
    def topology(self) -> str:
        return CHIPS[self.generation].slices[self.slice]


def entries(args: argparse.Namespace) -> Iterator[Entry]:
    """The sweep's entries in order: per model, generation and slice, exact BatchNorm then
    grouped (where the slice has more chips than a group)."""
    for model in args.models:
        for generation in args.generations:
            for slice_ in args.slices:
                chips = _chips(CHIPS[generation].slices[slice_])
                for bn in args.bn:
                    if bn == "grouped" and args.bn_group_size >= chips:
                        continue
                    group = args.bn_group_size if bn == "grouped" else 0
                    shape = (args.per_chip_batch, args.image_size, args.precision)
                    yield Entry(model, generation, slice_, bn, group, *shape)


def _chips(topology: str) -> int:
    return math.prod(int(d) for d in topology.split(":")[1].split("x"))


Compiled = Any  # jax.stages.Compiled
Compile = Callable[[Entry, int], Compiled]


def compile_entry(entry: Entry, per_chip_batch: int) -> Compiled:
    """The entry's training step compiled for its slice with `per_chip_batch` images per chip."""
    from flax_attention.training.tpu_topology import (
        StepShape,
        compile_train_step,
        topology_devices,
    )

    shape = StepShape(
        entry.model,
        per_chip_batch,
        entry.image_size,
        entry.precision,
        entry.bn_group_size,
    )
    return compile_train_step(shape, topology_devices(entry.topology))


def hbm_bytes(compiled: Compiled) -> dict[str, int]:
    """Per-chip memory of a compiled step: its parts and `hbm_bytes` = arguments + outputs +
    temporaries - aliased."""
    m = compiled.memory_analysis()
    parts = {
        "argument_bytes": m.argument_size_in_bytes,
        "output_bytes": m.output_size_in_bytes,
        "alias_bytes": m.alias_size_in_bytes,
        "temp_bytes": m.temp_size_in_bytes,
        "code_bytes": m.generated_code_size_in_bytes,
    }
    total = parts["argument_bytes"] + parts["output_bytes"] + parts["temp_bytes"]
    return {**parts, "hbm_bytes": total - parts["alias_bytes"]}


def roofline(compiled: Compiled, chip: Chip, per_chip_batch: int) -> dict[str, Any]:
    """The ESTIMATE of images per second per chip from XLA's per-chip cost analysis."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    flops, accessed = float(cost["flops"]), float(cost["bytes accessed"])
    compute_s, memory_s = flops / chip.peak_bf16_flops, accessed / chip.hbm_bytes_per_s
    return {
        "flops_per_chip": flops,
        "bytes_accessed_per_chip": accessed,
        "est_step_s": max(compute_s, memory_s),
        "est_img_per_s_per_chip": round(per_chip_batch / max(compute_s, memory_s), 1),
        "bound": "compute" if compute_s >= memory_s else "memory",
    }


def max_batch_estimate(
    entry: Entry, measured: int, compile_fn: Compile
) -> tuple[dict[str, Any], float]:
    """Largest per-chip batch whose memory fits the chip, extrapolated linearly from the
    entry's memory at its batch (`measured` bytes) and at a quarter of it; and compile seconds."""
    probe = max(1, entry.per_chip_batch // 4)
    start = time.perf_counter()
    at_probe = hbm_bytes(compile_fn(entry, probe))["hbm_bytes"]
    seconds = time.perf_counter() - start
    per_image = (measured - at_probe) / (entry.per_chip_batch - probe)
    method = f"estimate: linear in batch from {probe} and {entry.per_chip_batch}"
    if per_image <= 0:  # tiny shapes: the compiler's choices, not the batch, set the memory
        return {"max_batch": None, "max_batch_method": f"{method}: memory did not grow"}, seconds
    fixed = measured - per_image * entry.per_chip_batch
    linear = int((CHIPS[entry.generation].hbm_gib * GIB - fixed) // per_image)
    return {
        "max_batch": 2 ** int(math.log2(linear)) if linear >= 1 else 0,
        "max_batch_linear": linear,
        "max_batch_method": method,
        "fixed_bytes": int(fixed),
        "bytes_per_image": int(per_image),
    }, seconds


def max_batch_bisect(entry: Entry, start: int, compile_fn: Compile) -> tuple[dict, float]:
    """Largest power-of-two per-chip batch that compiles within the chip's HBM, searched from
    `start` (doubling while it fits, halving while it does not); and compile seconds."""
    capacity = CHIPS[entry.generation].hbm_gib * GIB
    tried: dict[int, bool] = {}
    seconds = 0.0

    def fits(batch: int) -> bool:
        nonlocal seconds
        began = time.perf_counter()
        try:
            ok = hbm_bytes(compile_fn(entry, batch))["hbm_bytes"] <= capacity
        except Exception as err:  # out of HBM fails the compile: that batch does not fit
            if not _is_compile_error(err):
                raise
            ok = False
        seconds += time.perf_counter() - began
        tried[batch] = ok
        return ok

    batch = max(1, start)
    if fits(batch):
        while fits(batch * 2):
            batch *= 2
    else:
        while batch > 1 and not fits(batch // 2):
            batch //= 2
        batch = batch // 2 if batch > 1 else 0
    return {"max_batch": batch, "max_batch_method": "bisect", "max_batch_tried": tried}, seconds


def _is_compile_error(err: Exception) -> bool:
    import jax

    from flax_attention.errors import ConfigError

    return isinstance(err, jax.errors.JaxRuntimeError | ConfigError)


def measure(entry: Entry, args: argparse.Namespace, compile_fn: Compile) -> dict[str, Any]:
    """One entry's row: what compiled, its memory, collectives, roofline and largest batch."""
    from flax_attention.training.collectives import count_collectives

    chip = CHIPS[entry.generation]
    row: dict[str, Any] = {
        "key": entry.key,
        **{k: getattr(entry, k) for k in Entry.__dataclass_fields__},
        "topology": entry.topology,
        "chips": _chips(entry.topology),
        "hbm_capacity_gib": chip.hbm_gib,
    }
    start = time.perf_counter()
    try:
        compiled = compile_fn(entry, entry.per_chip_batch)
    except Exception as err:
        if not _is_compile_error(err):
            raise
        seconds = round(time.perf_counter() - start, 1)
        return {**row, "ok": False, "error": _first_line(err), "compile_s": seconds}
    row["compile_s"] = round(time.perf_counter() - start, 1)
    row["ok"] = True
    row |= hbm_bytes(compiled)
    row["hbm_gib"] = round(row["hbm_bytes"] / GIB, 3)
    row["fits"] = row["hbm_bytes"] <= chip.hbm_gib * GIB
    hlo = compiled.as_text()
    row["collectives"] = count_collectives(hlo)
    row["collective_bytes"] = collective_bytes(hlo)
    row |= roofline(compiled, chip, entry.per_chip_batch)
    del compiled, hlo
    if args.max_batch != "none" and entry.slice in args.max_batch_slices:
        found, seconds = max_batch_estimate(entry, row["hbm_bytes"], compile_fn)
        if args.max_batch == "bisect":
            found, more = max_batch_bisect(entry, found["max_batch"] or 1, compile_fn)
            seconds += more
        row |= found
        row["max_batch_compile_s"] = round(seconds, 1)
    return row


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"[:400]


def read_rows(path: Path) -> dict[str, dict]:
    """The rows a results file holds, by key (empty when there is no file yet)."""
    if not path.exists():
        return {}
    return {row["key"]: row for row in json.loads(path.read_text())["rows"]}


def write_row(path: Path, row: dict[str, Any]) -> None:
    """Merge `row` into the results file and replace it atomically; re-read under a lock of
    its folder, so concurrent sweeps keep each other's rows."""
    path.parent.mkdir(parents=True, exist_ok=True)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        fcntl.flock(folder, fcntl.LOCK_EX)
        rows = read_rows(path)
        rows[row["key"]] = row
        _write(path, rows)
    finally:
        os.close(folder)  # releases the lock


def _write(path: Path, rows: dict[str, dict]) -> None:
    from flax_attention.training.metrics import replace_atomically

    doc = {
        "suite": SUITE,
        "device": device_name(),
        "compiled_for": "TPU slices described by libtpu (compile only, nothing ran)",
        "versions": {**versions(), "libtpu": _version("libtpu")},
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "chips": {name: vars(chip) for name, chip in CHIPS.items()},
        "shapes": {"image": "uint8 (B, H, W, 3) NHWC", "label": "int32 (B,)", "classes": 1000},
        "rows": sorted(rows.values(), key=lambda r: r["key"]),
    }
    replace_atomically(path, lambda tmp: tmp.write_text(json.dumps(doc, indent=1) + "\n"))


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def run(args: argparse.Namespace, compile_fn: Compile = compile_entry) -> Path:
    """Compile every entry the results file does not hold yet; returns the file's path."""
    path = args.out / f"{SUITE}.json"
    todo = [e for e in entries(args) if _wanted(read_rows(path).get(e.key), args)]
    print(f"{SUITE}: {len(todo)} entries to compile -> {path}", flush=True)
    for entry in todo:
        print(f"{SUITE}: {entry.key} ({entry.topology}) ...", flush=True)
        row = measure(entry, args, compile_fn)
        write_row(path, row)
        print(f"{SUITE}: {format_row(row)}", flush=True)
    return path


def _wanted(row: dict | None, args: argparse.Namespace) -> bool:
    return row is None or (args.retry_errors and not row["ok"])


def format_row(row: dict[str, Any]) -> str:
    if not row["ok"]:
        return f"{row['key']} ERROR {row['error'][:200]} ({row['compile_s']} s)"
    batch = f", max batch {row['max_batch']}" if "max_batch" in row else ""
    return (
        f"{row['key']} {row['hbm_gib']:.2f}/{row['hbm_capacity_gib']} GiB{batch}, "
        f"est {row['est_img_per_s_per_chip']:.0f} img/s/chip ({row['bound']}), "
        f"{row['collectives']['total']} collectives, compile {row['compile_s']} s"
    )


def tables(rows: list[dict[str, Any]]) -> str:
    """Markdown tables of `rows`: per entry of the smallest slices, memory, largest batch and
    the roofline estimate; per entry of larger slices, the collectives."""
    memory = [
        "| model | TPU | chips | HBM per chip, GiB (of) | largest batch per chip | "
        "img/s per chip (ESTIMATE) | compile s |",
        "|---|---|---|---|---|---|---|",
    ]
    collectives = [
        "| model | TPU | chips | BatchNorm | all-reduce | all-gather | other | MB | compile s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["model"], list(CHIPS).index(r["generation"]))):
        head = f"| {r['model']} | {r['generation']} | {r['chips']} |"
        if not r["ok"]:
            (memory if r["slice"] == "host" else collectives).append(
                f"{head} failed: {r['error'][:80]} |"
            )
            continue
        if r["slice"] == "host":
            largest = r.get("max_batch", "")
            est = f"{r['est_img_per_s_per_chip']:,.0f} ({r['bound']}-bound)"
            memory.append(
                f"{head} {r['hbm_gib']:.2f} ({r['hbm_capacity_gib']}) | {largest} | {est} | "
                f"{r['compile_s']:.0f} |"
            )
            continue
        counts = r["collectives"]
        other = counts["total"] - counts.get("all-reduce", 0) - counts.get("all-gather", 0)
        bn = r["bn"] + (f" ({r['bn_group_size']} chips)" if r["bn"] == "grouped" else "")
        collectives.append(
            f"{head} {bn} | {counts.get('all-reduce', 0)} | {counts.get('all-gather', 0)} | "
            f"{other} | {r['collective_bytes']['total'] / 1e6:,.1f} | {r['compile_s']:.0f} |"
        )
    return "\n".join(memory) + "\n\n" + "\n".join(collectives) + "\n"


def readme_table(rows: list[dict[str, Any]], model: str = "resnet50") -> str:
    """The README's TPU table: per generation, `model`'s exact-BatchNorm step on the host slice
    (HBM per chip, largest batch, roofline estimate) and the collective bytes per step of its
    largest compiled slice with exact and with grouped BatchNorm (blank where not compiled)."""
    ok = [r for r in rows if r["ok"] and r["model"] == model]
    lines = [
        "| TPU | images per chip | HBM per chip, GiB (of) | largest batch per chip (ESTIMATE) | "
        "img/s per chip (ESTIMATE) | chips | collectives per step, MB: exact / grouped BN |",
        "|---|---|---|---|---|---|---|",
    ]
    for generation in CHIPS:
        at_host = (r for r in ok if r["generation"] == generation and r["slice"] == "host")
        host = next((r for r in at_host if r["bn"] == "exact"), None)
        if host is None:
            continue
        pod = [r for r in ok if r["generation"] == generation and r["slice"] != "host"]
        chips = max((r["chips"] for r in pod), default=None)
        by_bn = {r["bn"]: r for r in pod if r["chips"] == chips}
        mb = " / ".join(
            f"{by_bn[bn]['collective_bytes']['total'] / 1e6:,.1f}" if bn in by_bn else "-"
            for bn in BN_FORMS
        )
        lines.append(
            f"| {generation} | {host['per_chip_batch']} | {host['hbm_gib']:.2f} "
            f"({host['hbm_capacity_gib']}) | {host.get('max_batch', '-')} | "
            f"{host['est_img_per_s_per_chip']:,.0f} | {chips or '-'} | {mb if chips else '-'} |"
        )
    return "\n".join(lines) + "\n"


def chart(path: Path) -> Path | None:
    """HBM per chip against capacity and the estimated img/s per chip of the exact-BatchNorm
    rows of the smallest slice, per model and generation (PNG beside the JSON); None without
    matplotlib or rows."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [r for r in read_rows(path).values() if r["ok"] and r["bn"] == "exact"]
    smallest = {}
    for r in sorted(rows, key=lambda r: r["chips"]):
        smallest.setdefault((r["model"], r["generation"]), r)
    if not smallest:
        return None
    models = sorted({m for m, _ in smallest})
    generations = [g for g in CHIPS if any(g == gen for _, gen in smallest)]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / len(generations)
    for i, gen in enumerate(generations):
        xs = [m + i * width for m in range(len(models))]
        pick = [smallest.get((model, gen)) for model in models]
        axes[0].bar(xs, [r["hbm_gib"] if r else 0 for r in pick], width, label=gen)
        capacity = CHIPS[gen].hbm_gib
        axes[0].hlines(capacity, xs[0] - width / 2, xs[-1] + width / 2, colors=f"C{i}", ls="--")
        axes[1].bar(xs, [r["est_img_per_s_per_chip"] if r else 0 for r in pick], width, label=gen)
    batch = next(iter(smallest.values()))["per_chip_batch"]
    for ax, label in zip(
        axes,
        ("HBM per chip, GiB (dashed: capacity)", "img/s per chip (ESTIMATE: roofline)"),
        strict=True,
    ):
        ticks = [m + 0.4 - width / 2 for m in range(len(models))]
        ax.set_xticks(ticks, models, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    fig.suptitle(f"training step compiled for TPU (AOT, bf16, {batch} img/chip, exact BN)")
    fig.tight_layout()
    out = path.with_suffix(".png")
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    split = lambda text: tuple(s for s in text.split(",") if s)  # noqa: E731
    p = argparse.ArgumentParser(
        prog="python -m benchmarks --suites tpu_aot",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--suites", default=SUITE, help="tpu_aot (alone)")
    p.add_argument(
        "--models", type=split, default=None, help="comma-separated names (default: every model)"
    )
    p.add_argument("--generations", type=split, default=tuple(CHIPS), help="of " + ",".join(CHIPS))
    p.add_argument("--slices", type=split, default=SLICES, help="of " + ",".join(SLICES))
    p.add_argument("--bn", type=split, default=BN_FORMS, help="BatchNorm: exact,grouped")
    p.add_argument("--bn-group-size", type=int, default=16, help="chips per BatchNorm group")
    p.add_argument("--per-chip-batch", type=int, default=128)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--precision", default="bf16", choices=("bf16", "fp32"))
    p.add_argument("--max-batch", default="estimate", choices=("estimate", "bisect", "none"))
    p.add_argument("--max-batch-slices", type=split, default=("host",), help="where to find it")
    p.add_argument("--retry-errors", action="store_true", help="recompile entries that failed")
    p.add_argument(
        "--charts-only", action="store_true", help="redraw the PNG, print the tables of the JSON"
    )
    p.add_argument("--out", type=Path, default=TPU_AOT_RESULTS, help="results folder")
    args = p.parse_args(argv)
    from flax_attention.models import list_models

    args.models = args.models or tuple(list_models())
    for name, values, known in (
        ("--models", args.models, list_models()),
        ("--suites", (args.suites,), (SUITE,)),
        ("--generations", args.generations, CHIPS),
        ("--slices", args.slices, SLICES),
        ("--bn", args.bn, BN_FORMS),
    ):
        unknown = [v for v in values if v not in known]
        if unknown:
            p.error(f"{name}: unknown {', '.join(unknown)}; choose from {', '.join(known)}")
    return args


def requested(argv: list[str]) -> bool:
    """Whether a `python -m benchmarks` command line asks for this suite."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--suites", default="")
    return SUITE in p.parse_known_args(argv)[0].suites.split(",")


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    import jax

    # Compiling for TPU slices needs no local accelerator; the CPU backend avoids libtpu
    # looking for a TPU on this host.
    jax.config.update("jax_platforms", os.environ.get("JAX_PLATFORMS") or "cpu")
    path = args.out / f"{SUITE}.json"
    if not args.charts_only:
        path = run(args)
    rows = list(read_rows(path).values())
    print(tables(rows), flush=True)
    print(readme_table(rows), flush=True)
    print(f"{SUITE}: {path}  chart: {chart(path)}", flush=True)


if __name__ == "__main__":
    main()
