"""The `"auto"` tables from a modules suite result, for each gate and stage shape the fastest
forward+backward:
- `tap_convs.AUTO` (`spatial_conv="auto"`): the spatial-conv formulation of CBAM and BAM on the
  XLA kernel path;
- `dispatch.AUTO` (`impl="auto"`): the kernel impl (xla, xla_passes, pallas) of SE and CBAM,
  each with the spatial-conv formulation of `tap_convs.AUTO`, for the gates that have fused
  impls measured; a fused impl only where it beats XLA beyond the measured spread.

`python -m benchmarks.auto_table [benchmarks/results/<device>/modules.json]` prints both, to
paste into flax_attention/layers/tap_convs.py and flax_attention/kernels/dispatch.py (the
default file is the H200's, which the committed tables come from; tests check that they agree).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

from benchmarks.common import RESULTS, read_result
from benchmarks.modules import KERNEL_IMPLS, split_impl

SOURCE = RESULTS / "nvidia-h200" / "modules.json"
Table = dict[str, tuple[tuple[int, str], ...]]  # gate -> ((H * W, choice), ...)


def _timed_rows(rows: list[dict]) -> Iterator[tuple[dict, int]]:
    """(row, H * W) for each timed flax forward+backward row."""
    for row in rows:
        flax = row.get("framework", "flax") == "flax"
        if flax and row.get("mode") == "fwdbwd" and "median_ms" in row:
            yield row, row["shape"][1] * row["shape"][2]


def _fastest(rows: list[dict], choice_of: Callable[[dict], str | None]) -> Table:
    """gate -> ((H * W, fastest choice), ...), largest H * W first, over the flax
    forward+backward rows for which `choice_of(row)` names a choice (None: not a candidate)."""
    best: dict[str, dict[int, tuple[float, str]]] = {}
    for row, size in _timed_rows(rows):
        choice = choice_of(row)
        if choice is None:
            continue
        gate = best.setdefault(row["name"], {})
        if size not in gate or row["median_ms"] < gate[size][0]:
            gate[size] = (row["median_ms"], choice)
    return {
        name: tuple((size, choice) for size, (_, choice) in sorted(sizes.items(), reverse=True))
        for name, sizes in best.items()
    }


def fastest_formulations(rows: list[dict]) -> Table:
    """`tap_convs.AUTO`'s table: CBAM's and BAM's spatial-conv formulations on the XLA kernel
    path ("xla" = the library conv, "xla+<formulation>")."""

    def formulation(row: dict) -> str | None:
        impl, form = split_impl(row["impl"])
        spatial = row.get("name") in ("cbam", "bam") and impl == "xla" and form != "auto"
        return form if spatial else None

    return _fastest(rows, formulation)


def fastest_impls(rows: list[dict]) -> Table:
    """`dispatch.AUTO`'s table: per gate that has fused impls measured (SE, CBAM) and stage, the
    fastest fused impl where even its slow samples beat XLA's fast ones (its p90 below XLA's
    p10), else "xla".

    Each impl is compared with the spatial-conv formulation that `spatial_conv="auto"` gives it
    (`fastest_formulations`; SE has none): that is the gate a user of `impl="auto"` runs. The
    spread rule keeps noise from switching a stage away from XLA, which in a residual block
    also gives up the fusion with the BatchNorm before the gate (layers.norm_gate).
    """
    forms = {gate: dict(entries) for gate, entries in fastest_formulations(rows).items()}
    measured: dict[str, dict[int, dict[str, dict]]] = {}  # gate -> H * W -> impl -> row
    for row, size in _timed_rows(rows):
        impl, form = split_impl(row["impl"])
        gate = row.get("name")
        auto_form = forms.get(gate, {}).get(size, "conv")  # SE has no spatial conv
        if gate in ("se", "cbam") and impl in KERNEL_IMPLS and form == auto_form:
            measured.setdefault(gate, {}).setdefault(size, {})[impl] = row
    table = {}
    for gate, sizes in measured.items():
        if not any(impl != "xla" for by_impl in sizes.values() for impl in by_impl):
            continue
        choices = []
        for size in sorted(sizes, reverse=True):
            fused = {impl: row for impl, row in sizes[size].items() if impl != "xla"}
            best = min(fused, key=lambda impl: fused[impl]["median_ms"], default=None)
            xla = sizes[size].get("xla")
            wins = best is not None and (xla is None or fused[best]["p90_ms"] < xla["p10_ms"])
            choices.append((size, best if wins else "xla"))
        table[gate] = tuple(choices)
    return table


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    path = Path(argv[0]) if argv else SOURCE
    rows = read_result(path, "modules")["rows"]
    print("tap_convs.AUTO:", json.dumps(fastest_formulations(rows)))
    print("dispatch.AUTO:", json.dumps(fastest_impls(rows)))


if __name__ == "__main__":
    main()
