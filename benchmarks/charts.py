"""Charts: a suite's rows as a grouped bar chart, a PNG beside its JSON. Each suite says what
its chart shows in its `CHART`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.device import device_name

Row = dict[str, Any]


@dataclass(frozen=True)
class ChartSpec:
    """What a suite's chart draws: bars of `value` (axis label `label`), grouped by `group(row)`,
    one series per `series(row)`."""

    value: str
    label: str
    group: Callable[[Row], str]
    series: Callable[[Row], str]


def series(row: Row) -> str:
    """A row's bar series: its `impl` (input and scaling suites, older results) or framework,
    with the spatial-conv formulation where it has one."""
    return row.get("impl") or " ".join(
        filter(None, (row.get("framework"), row.get("spatial_conv")))
    )


def chart(path: Path, suite: str, rows: list[Row], spec: ChartSpec) -> Path | None:
    """A grouped bar chart of one suite's rows (PNG next to the JSON); None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [r for r in rows if r.get(spec.value) is not None]
    if not rows:
        return None
    groups = list(dict.fromkeys(spec.group(r) for r in rows))
    names = list(dict.fromkeys(spec.series(r) for r in rows))
    fig, ax = plt.subplots(figsize=(max(8, 0.6 * len(groups) * max(1, len(names)) / 2), 5))
    width = 0.8 / max(1, len(names))
    for i, s in enumerate(names):
        vals = []
        for g in groups:
            match = [r[spec.value] for r in rows if spec.group(r) == g and spec.series(r) == s]
            vals.append(match[0] if match else 0.0)
        ax.bar(np.arange(len(groups)) + i * width, vals, width, label=s)
    ax.set_xticks(
        np.arange(len(groups)) + 0.4 - width / 2, groups, rotation=45, ha="right", fontsize=7
    )
    ax.set_ylabel(spec.label)
    ax.set_title(f"{suite} on {device_name()}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    out = path.with_suffix(".png")
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
