"""The spatial-conv rows of `layers.policy.TABLES` (CBAM's and BAM's `formulation="auto"`) from
a modules suite result: for each gate at each stage shape where more than one formulation was
timed, the formulation of the fastest forward+backward.

`python -m benchmarks.lab.auto_table [benchmarks/results/<device>/modules.json]` prints the rows of
the result's device kind to paste into flax_attention/layers/policy.py (the default file is the
H200's; tests check that every committed modules.json and its device's rows agree).
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
    """The policy's spatial-conv rows: gate -> ((H * W, fastest formulation), ...), largest H * W
    first, over the flax forward+backward rows of CBAM and BAM that ran one formulation; a size
    where only one formulation ran measured no choice and has no row (nor a gate without any)."""
    best: dict[str, dict[int, tuple[float, str]]] = {}
    forms: dict[tuple[str, int], set[str]] = {}
    for row in rows:
        form = spatial_conv_of(row)
        timed = row.get("framework", "flax") == "flax" and "median_ms" in row
        if not timed or row.get("mode") != "fwdbwd" or row.get("name") not in SPATIAL_GATES:
            continue
        if form is None or form == "auto":
            continue
        size = row["shape"][1] * row["shape"][2]
        forms.setdefault((row["name"], size), set()).add(form)
        gate = best.setdefault(row["name"], {})
        if size not in gate or row["median_ms"] < gate[size][0]:
            gate[size] = (row["median_ms"], form)
    table = {
        name: tuple(
            (size, form)
            for size, (_, form) in sorted(sizes.items(), reverse=True)
            if len(forms[name, size]) > 1
        )
        for name, sizes in best.items()
    }
    return {name: rows for name, rows in table.items() if rows}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    path = Path(argv[0]) if argv else SOURCE
    result = read_result(path, "modules")
    print(f"{result['device']}:", json.dumps(fastest_formulations(result["rows"])))


if __name__ == "__main__":
    main()
