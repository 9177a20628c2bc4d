"""`tap_convs.AUTO` from a modules suite result: for each gate with spatial-conv rows (CBAM,
BAM) and each stage shape, the formulation whose forward+backward was fastest.

`python -m benchmarks.auto_table [benchmarks/results/<device>/modules.json]` prints the table
to paste into flax_attention/layers/tap_convs.py (the default file is the H200's, which the
committed table comes from; tests check that they agree).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from benchmarks.common import RESULTS
from benchmarks.modules import split_impl

SOURCE = RESULTS / "nvidia-h200" / "modules.json"
GATES = ("cbam", "bam")


def fastest_formulations(rows: list[dict]) -> dict[str, tuple[tuple[int, str], ...]]:
    """gate -> ((H * W, fastest formulation), ...) over the forward+backward rows of the XLA
    kernel path ("xla" = the library conv, "xla+<formulation>"), largest H * W first."""
    best: dict[str, dict[int, tuple[float, str]]] = {}
    for row in rows:
        if row.get("name") not in GATES or row.get("mode") != "fwdbwd" or "median_ms" not in row:
            continue
        impl, form = split_impl(row["impl"])
        if impl != "xla" or form == "auto":
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
    table = fastest_formulations(json.loads(path.read_text())["rows"])
    print(json.dumps(table))


if __name__ == "__main__":
    main()
