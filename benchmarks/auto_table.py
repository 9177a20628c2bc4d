"""The `"auto"` tables from a modules suite result, for each gate and stage shape the fastest
forward+backward:
- `tap_convs.AUTO` (`spatial_conv="auto"`): the spatial-conv formulation of CBAM and BAM on the
  XLA kernel path;
- `dispatch.AUTO` (`impl="auto"`): the kernel impl (xla, xla_passes, pallas) of SE and CBAM with
  the library conv, for the gates that have fused impls measured.

`python -m benchmarks.auto_table [benchmarks/results/<device>/modules.json]` prints both, to
paste into flax_attention/layers/tap_convs.py and flax_attention/kernels/dispatch.py (the
default file is the H200's, which the committed tables come from; tests check that they agree).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

from benchmarks.common import RESULTS, read_result
from benchmarks.modules import KERNEL_IMPLS, split_impl

SOURCE = RESULTS / "nvidia-h200" / "modules.json"
Table = dict[str, tuple[tuple[int, str], ...]]  # gate -> ((H * W, choice), ...)


def _fastest(rows: list[dict], choice_of: Callable[[dict], str | None]) -> Table:
    """gate -> ((H * W, fastest choice), ...), largest H * W first, over the flax
    forward+backward rows for which `choice_of(row)` names a choice (None: not a candidate)."""
    best: dict[str, dict[int, tuple[float, str]]] = {}
    for row in rows:
        if row.get("framework", "flax") != "flax" or row.get("mode") != "fwdbwd":
            continue
        choice = choice_of(row)
        if choice is None or "median_ms" not in row:
            continue
        size = row["shape"][1] * row["shape"][2]
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
    """`dispatch.AUTO`'s table: the kernel impls of the gates that have fused ones (SE, CBAM),
    each with the library conv; a gate measured with XLA alone is left out."""

    def kernel_impl(row: dict) -> str | None:
        impl, form = split_impl(row["impl"])
        fused = row.get("name") in ("se", "cbam") and form == "conv" and impl in KERNEL_IMPLS
        return impl if fused else None

    table = _fastest(rows, kernel_impl)
    measured = {r["name"] for r in rows if kernel_impl(r) not in (None, "xla")}
    return {gate: choices for gate, choices in table.items() if gate in measured}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    path = Path(argv[0]) if argv else SOURCE
    rows = read_result(path, "modules")["rows"]
    print("tap_convs.AUTO:", json.dumps(fastest_formulations(rows)))
    print("dispatch.AUTO:", json.dumps(fastest_impls(rows)))


if __name__ == "__main__":
    main()
