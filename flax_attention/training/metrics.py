"""Training metrics: running means, throughput, `metrics.jsonl` and a PNG plot of the curves."""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np

from flax_attention.errors import RunFileError


class Meter:
    """Means of per-step scalar metrics and images/s since the last `summary()`."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, float] = {}
        self.steps = 0
        self.images = 0
        self.start = time.perf_counter()

    def update(self, metrics: dict[str, float], images: int) -> None:
        for key, value in metrics.items():
            self.sums[key] = self.sums.get(key, 0.0) + float(value)
        self.steps += 1
        self.images += images

    def summary(self) -> dict[str, float]:
        """{name: mean over the steps, ..., "images_per_s": throughput}; then resets."""
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        out = {k: v / max(self.steps, 1) for k, v in self.sums.items()}
        out["images_per_s"] = self.images / elapsed
        self.reset()
        return out


class MetricsLog:
    """Append-only `metrics.jsonl`: one JSON object per line, each with a `step`."""

    def __init__(self, path: str | Path, *, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled

    def truncate_after(self, step: int) -> None:
        """Drop records past `step` (written by a run that is being resumed from `step`), and a
        partial last line; the file is replaced atomically."""
        if self.enabled and self.path.exists():
            text = "".join(json.dumps(r) + "\n" for r in self.records() if r["step"] <= step)
            replace_atomically(self.path, lambda temporary: temporary.write_text(text))

    def check_empty(self) -> None:
        """`FileExistsError` naming the file if it holds anything: records another run would
        mix with, or lose to, this one's."""
        if self.path.exists() and self.path.stat().st_size:
            raise FileExistsError(
                f"{self.path} already holds records, but there is no checkpoint to resume "
                "from; move it away or choose another --workdir"
            )

    def write(self, record: dict) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")

    def records(self) -> list[dict]:
        """Every record. A partial last line (a run killed while writing it) is dropped with a
        warning; any other line that is not a JSON object with a "step" raises RunFileError."""
        if not self.path.exists():
            return []
        text = self.path.read_text()
        lines = text.splitlines()
        records = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if not isinstance(record, dict) or "step" not in record:
                    raise ValueError("not a record")
            except ValueError:
                if number == len(lines) and not text.endswith("\n"):
                    print(
                        f"warning: dropping the partial last line of {self.path} "
                        f"(a run stopped while writing it): {line[:80]!r}",
                        file=sys.stderr,
                    )
                    continue
                raise RunFileError(
                    f"{self.path}, line {number}: not a JSON record with a step: {line[:80]!r}; "
                    "move it away (or repair the line) to resume"
                ) from None
            records.append(record)
        return records


def plot_curves(records: list[dict], path: str | Path, title: str = "") -> Path:
    """PNG with two panels: training loss per logged step, and accuracy (train top-1 and
    evaluation top-1) in percent. Drawn with Pillow, so no plotting library is needed."""
    from PIL import Image, ImageDraw

    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_top1" in r]
    image = Image.new("RGB", (1000, 420), "white")
    draw = ImageDraw.Draw(image)
    if title:
        draw.text((10, 5), title, fill="black")
    steps = [r["step"] for r in train + evals] or [0, 1]
    x_range = (min(steps), max(max(steps), min(steps) + 1))
    loss = [(r["step"], r["loss"]) for r in train]
    y_max = max([v for _, v in loss], default=1.0)
    _panel(draw, (60, 30, 480, 380), x_range, (0.0, y_max * 1.05), "train loss", [(loss, "blue")])
    series = [
        ([(r["step"], 100 * r["top1"]) for r in train if "top1" in r], "blue"),
        ([(r["step"], 100 * r["eval_top1"]) for r in evals], "red"),
    ]
    _panel(
        draw, (560, 30, 980, 380), x_range, (0.0, 100.0), "top-1 % (blue train, red eval)", series
    )
    path = Path(path)
    replace_atomically(path, lambda temporary: image.save(temporary, format="PNG"))
    return path


def replace_atomically(path: Path, write: Callable[[Path], object]) -> None:
    """`write(temporary)` to a new hidden sibling of `path`, then rename it to `path`: readers
    see the old file or the new one, never part of one. The sibling is removed on failure."""
    temporary = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        write(temporary)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def _panel(draw, box, x_range, y_range, label, series) -> None:
    """Axes in `box` (left, top, right, bottom) with 5 ticks each and `series` of (x, y) lines."""
    left, top, right, bottom = box
    draw.rectangle(box, outline="black")
    draw.text((left, top - 15), label, fill="black")

    def to_px(x, y):
        fx = (x - x_range[0]) / (x_range[1] - x_range[0])
        fy = (y - y_range[0]) / max(y_range[1] - y_range[0], 1e-12)
        return left + fx * (right - left), bottom - fy * (bottom - top)

    for t in np.linspace(0, 1, 5):
        x = x_range[0] + t * (x_range[1] - x_range[0])
        y = y_range[0] + t * (y_range[1] - y_range[0])
        px, _ = to_px(x, y_range[0])
        _, py = to_px(x_range[0], y)
        draw.text((px - 10, bottom + 5), f"{x:.0f}", fill="black")
        draw.text((left - 45, py - 6), f"{y:.3g}", fill="black")
    for points, color in series:
        pixels = [to_px(x, y) for x, y in points]
        if len(pixels) > 1:
            draw.line(pixels, fill=color, width=2)
        for px, py in pixels if len(pixels) < 30 else []:
            draw.ellipse((px - 3, py - 3, px + 3, py + 3), fill=color)
