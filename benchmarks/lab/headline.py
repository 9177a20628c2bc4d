"""The README's headline table from one `train` suite result: images/s of each model's training
step, ours and PyTorch's, from the same run.

`python -m benchmarks.lab.headline [benchmarks/results/<device>/train.json]` prints the caption and
the markdown table to paste into README.md; benchmarks/tests/test_lab.py checks that the README's table
is what this prints for the file its caption names.
"""

from __future__ import annotations

import sys
from pathlib import Path

from benchmarks.results import read_result
from benchmarks.settings import ROOT

MODELS = ("resnet50", "seresnet50", "cbam_resnet50", "bam_resnet50", "epsanet50_small")
BASELINE = "resnet50"  # "of our resnet50": the gates' cost in the network
SOURCE = Path("benchmarks/results/nvidia-h100-80gb-hbm3/train.json")  # the README's table


# Our row of a model: results from before the gates' `impl` argument was removed hold a row per
# impl run, the default's named "auto" (in older ones "xla"); later rows name none.
DEFAULT_IMPLS = ("auto", "xla")


def _rate(rows: list[dict], model: str, framework: str) -> dict | None:
    """The row of `model` under `framework` with a throughput (ours: the default's)."""
    rows = [
        row
        for row in rows
        if row["name"] == model and row["framework"] == framework and "img_per_s" in row
    ]
    if framework == "flax":
        rows = [row for impl in DEFAULT_IMPLS for row in rows if row.get("impl", "xla") == impl]
    return rows[0] if rows else None


def _cell(row: dict | None, *, source: bool = False) -> str:
    if row is None:
        return "-"
    text = f"{row['img_per_s']:.0f}"
    return f"{text} (timm)" if source and row.get("source") == "timm" else text


def _ratio(numerator: dict | None, denominator: dict | None) -> str:
    if numerator is None or denominator is None:
        return "-"
    return f"{numerator['img_per_s'] / denominator['img_per_s']:.2f}×"


def headline(result: dict, source: Path) -> str:
    """Caption and markdown table for the train-suite `result` read from `source` (a path
    relative to the repository root, named in the caption)."""
    versions = result["versions"]
    torch = f"torch {versions['torch']}+cu{versions['torch_cuda'].replace('.', '')}"
    caption = (
        f"Training step on one {result['device']} (batch 256, 224×224, bf16 compute, float32 "
        f"parameters, SGD momentum; jax {versions['jax']}, {torch}; `{source.as_posix()}`, "
        f"{result['time_utc'][:10]}), images/s:"
    )
    rows = result["rows"]
    baseline = _rate(rows, BASELINE, "flax")
    lines = [
        caption,
        "",
        "| model | ours | of our resnet50 | torch eager | torch.compile | ours / torch.compile |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for model in MODELS:
        ours = _rate(rows, model, "flax")
        eager, compiled = _rate(rows, model, "torch"), _rate(rows, model, "torch.compile")
        cells = [
            model,
            _cell(ours),
            _ratio(ours, baseline),
            _cell(eager, source=True),
            _cell(compiled),
            _ratio(ours, compiled),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    source = Path(argv[0]) if argv else SOURCE
    path = source if source.is_absolute() else ROOT / source
    print(headline(read_result(path, "train"), source))


if __name__ == "__main__":
    main()
