"""CBAM's and BAM's spatial-conv formulation per stage, timed in the whole training step.

`layers.policy`'s table picks, per device kind and stage size, the formulation of the spatial gates' convs
(`conv`, `shifts`, `im2col`) that was fastest for the module alone (modules suite, batch 128).
In the network the choice meets the rest of the step (what XLA fuses the taps with, cuDNN's
algorithms at batch 256): the H200 profile of cbam_resnet50 (2026-11-30) shows `im2col` at
28x28 writing its (N, H, W, 98) taps at 0.23 ms per block, and cuDNN's kernel gradient of the
7x7 conv at 56x56 taking 0.24 ms per block. So this times the train suite's step (batch 256,
bf16) with this device's table, then with one stage's entry swapped for each other
formulation, one stage at a time (the model built with that per-size rule as its gates'
formulation: the library's tables are never changed); a row's `vs_auto_ms` is its step time minus the table's.

The H200 result (2026-11-30) is bam_resnet50's: every swap is slower than the table's (`conv`,
`im2col`, `im2col`), by 1.0-1.1 ms at stage 1 and 0.2-0.8 ms at stages 2-3. That run also swapped
stage 4, where bam_resnet50 has no BAM: those two rows time the same program as the table's and
came out +0.48 and +0.60 ms, the noise of one row. An earlier partial cbam_resnet50 run (in git
history) found every swap of stages 1-3 slower than the then table (`conv`, `im2col`, `conv`,
`shifts`); it predates the narrow conv's kernel gradient on a major axis, after which `shifts`
measured fastest at every stage (modules suite) and +5.7% in the network (5,521 against 5,224
img/s, one interleaved A/B).

`python -m benchmarks.lab.experiments.spatial_convs [--models cbam_resnet50,bam_resnet50] [--quick]
[--out DIR]` writes `<out>/spatial_convs.json` (by default
benchmarks/lab/experiments/results/<device>/) after every row.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path

import jax

from benchmarks import train
from benchmarks.__main__ import SAMPLING
from benchmarks.device import device_slug
from benchmarks.results import error_text
from benchmarks.settings import Settings
from flax_attention.layers import policy, tap_convs

# model -> (its gate's operation in layers.policy, how many stages have one: BAM sits after stages 1-3 only)
GATES = {"cbam_resnet50": ("cbam", 4), "bam_resnet50": ("bam", 3)}
RESULTS = Path(__file__).resolve().parent / "results"


def stage_sizes(image: int) -> tuple[int, ...]:
    """H (= W) of ResNet-50's four stages for a square `image`: strides 4, 8, 16, 32."""
    return tuple(image // stride for stride in (4, 8, 16, 32))


def stage_rule(choices: dict[int, str]) -> policy.Nearest:
    """The per-size rule that computes the gate at H*W by `choices[H*W]`."""
    return policy.Nearest(tuple(sorted(choices.items(), reverse=True)))


def measure(
    name: str, settings: Settings, batch: int, image: int, formulations: policy.Formulations
) -> dict:
    """The train suite's row of `name`'s step computed as `formulations` says, with its
    convolutions counted in the compiled HLO."""
    step = train.flax_step(name, batch, image, settings.inputs, formulations)
    hlo = step.compiled.as_text()
    convolutions = hlo.count(" convolution(") + hlo.count("__cudnn$conv")
    return {**train.step_row(step, settings, batch), "hlo_convolutions": convolutions}


def cases(sizes: tuple[int, ...], gate: str, stages: int) -> Iterator[tuple[int | None, dict]]:
    """(swapped stage or None, H*W -> formulation): this device's table, then the first
    `stages` stages each with every other formulation."""
    library = {h * h: policy.choose(gate, h * h) for h in sizes}
    yield None, library
    for stage, h in enumerate(sizes[:stages], start=1):
        for form in tap_convs.FORMULATIONS:
            if form != library[h * h]:
                yield stage, {**library, h * h: form}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--models", default=",".join(GATES), help="comma-separated, of " + str(list(GATES))
    )
    p.add_argument("--quick", action="store_true", help="tiny shapes, stage 1 only (CPU smoke)")
    p.add_argument("--out", type=Path, help="folder for spatial_convs.json")
    args = p.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    unknown = [m for m in models if m not in GATES]
    if unknown or not models:
        p.error(f"--models: unknown {unknown or 'none given'}; choose from {list(GATES)}")
    args.out = args.out or RESULTS / device_slug(args.quick)
    settings = Settings.make(args.quick)
    if not args.quick:  # the train suite's sampling: its step times are comparable
        for key, value in SAMPLING["train"].items():
            setattr(settings, key, value)
    batch = train.QUICK_BATCH if args.quick else train.BATCH
    image = train.QUICK_IMAGE if args.quick else train.IMAGE
    sizes = stage_sizes(image)
    meta = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "batch": batch}
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in models:
        (gate, stages), auto_ms = GATES[name], None
        for stage, choices in cases(sizes, gate, 1 if args.quick else stages):
            row = {"name": name, "swapped_stage": stage, "shape": [batch, image, image, 3]}
            row["formulations"] = [choices[h * h] for h in sizes]  # stages 1-4
            try:
                formulations = {gate: stage_rule(choices)}
                row.update(measure(name, settings, batch, image, formulations))
                if stage is None:
                    auto_ms = row["median_ms"]
                elif auto_ms is not None:
                    row["vs_auto_ms"] = round(row["median_ms"] - auto_ms, 3)
            except Exception as e:
                row["error"] = error_text(e)
            rows.append(row)
            print(
                f"{name} stage {stage or '-'} {' '.join(row['formulations']):26s}"
                f" {row.get('median_ms', float('nan')):8.3f} ms"
                f" {row.get('vs_auto_ms', 0.0):+7.3f} {row.get('error', '')}",
                flush=True,
            )
            (args.out / "spatial_convs.json").write_text(
                json.dumps({**meta, "rows": rows}, indent=1)
            )


if __name__ == "__main__":
    main()
