"""`tap_convs.AUTO` (`spatial_conv="auto"`) from a modules suite result: for CBAM and BAM at each
stage shape, the spatial-conv formulation of the fastest forward+backward.

`python -m benchmarks.lab.auto_table [benchmarks/results/<device>/modules.json]` prints the table to
paste into flax_attention/layers/tap_convs.py (the default file is the H200's, which the
committed table comes from; tests check that they agree).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from benchmarks.results import read_result
from benchmarks.settings import RESULTS

SOURCE = RESULTS / "nvidia-h200" / "modules.json"
Table = dict[str, tuple[tuple[int, str], ...]]  # gate -> ((H * W, choice), ...)
SPATIAL_GATES = ("cbam", "bam")


def spatial_conv_of(row: dict) -> str | None:
    """The spatial-conv formulation a modules row of ours ran, None where it names none.
    Results from before the gates' `impl` argument was removed name it in their `impl` label:
    "xla" the library conv, "xla+<formulation>"; other impls ran other gate kernels."""
    if "spatial_conv" in row:
        return row["spatial_conv"]
    impl, _, form = row.get("impl", "").partition("+")
    return (form or "conv") if impl == "xla" else None


def fastest_formulations(rows: list[dict]) -> Table:
    """`tap_convs.AUTO`'s table: gate -> ((H * W, fastest formulation), ...), largest H * W
    first, over the flax forward+backward rows of CBAM and BAM that ran one formulation."""
    best: dict[str, dict[int, tuple[float, str]]] = {}
    for row in rows:
        form = spatial_conv_of(row)
        timed = row.get("framework", "flax") == "flax" and "median_ms" in row
        if not timed or row.get("mode") != "fwdbwd" or row.get("name") not in SPATIAL_GATES:
            continue
        if form is None or form == "auto":
            continue
        size = row["shape"][1] * row["shape"][2]
        gate = best.setdefault(row["name"], {})
        if size not in gate or row["median_ms"] < gate[size][0]:
            gate[size] = (row["median_ms"], form)
    return {
        name: tuple((size, form) for size, (_, form) in sorted(sizes.items(), reverse=True))
        for name, sizes in best.items()
    }


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    path = Path(argv[0]) if argv else SOURCE
    rows = read_result(path, "modules")["rows"]
    print("tap_convs.AUTO:", json.dumps(fastest_formulations(rows)))


if __name__ == "__main__":
    main()
