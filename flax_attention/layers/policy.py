"""How to compute it: the one home of the measured formulation choices, per device kind.

Several operations can be computed in formulations that give the same sums (only the order of
float32 additions differs) at different speeds. Each module takes one argument,
`formulation`, that says how to compute its operation: a formulation's name, "auto" (this
device's measured choice, `choose`), or a `Rule` (a per-size choice of its own, as experiments
pass). Models take `formulations`, a mapping from operation to such a value.

Operations, their formulations, and the library's default (what XLA's or the layer's plain
form computes, used wherever nothing was measured):
- "cbam": CBAM's spatial-gate conv (layers.tap_convs: conv, shifts, im2col), by H * W; "conv";
- "bam": BAM's spatial-branch convs (the same formulations), by H * W; "conv";
- "psa": PSA's grouped branch convs (layers.branch_convs: grouped, dense, merged), by the
  multiply-adds per output pixel of the dense kernel(s); "grouped";
- "stem": the ResNet stem conv (architectures.stem: direct, space_to_depth); "direct".

`TABLES` holds the measurements, keyed by device kind (`jax.Device.device_kind`, whitespace
normalised): "NVIDIA H100 80GB HBM3" and "NVIDIA H200" are different rows; a device without a
row (CPU, any other GPU) gets the library's defaults. Everything here is immutable.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

import jax

FORMULATIONS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "cbam": ("conv", "shifts", "im2col"),
        "bam": ("conv", "shifts", "im2col"),
        "psa": ("grouped", "dense", "merged"),
        "stem": ("direct", "space_to_depth"),
    }
)
LIBRARY_DEFAULTS: Mapping[str, str] = MappingProxyType(
    {op: choices[0] for op, choices in FORMULATIONS.items()}
)
AUTO = "auto"


@dataclass(frozen=True)
class Nearest:
    """The formulation measured fastest at the size nearest (in ratio) to the one asked:
    `rows` is ((H * W, formulation), ...)."""

    rows: tuple[tuple[int, str], ...]

    def pick(self, size: int) -> str:
        return min(self.rows, key=lambda row: abs(math.log(row[0] / size)))[1]


@dataclass(frozen=True)
class Always:
    """One formulation at every size."""

    formulation: str

    def pick(self, size: object) -> str:
        return self.formulation


@dataclass(frozen=True)
class BranchShape:
    """PSA's branch convs: input channels, each branch's output width, kernels and groups."""

    in_channels: int
    split: int
    kernel_sizes: tuple[int, ...]
    groups: tuple[int, ...]


@dataclass(frozen=True)
class DenseUpTo:
    """PSA's plan: "merged" (one conv for all branches) when the merged dense kernel has at most
    `macs` multiply-adds per output pixel, else per branch "dense" where its block-diagonal
    kernel has at most `macs`, "grouped" elsewhere."""

    macs: int

    def pick(self, shape: BranchShape) -> tuple[str, ...]:
        size, per_pixel = max(shape.kernel_sizes), shape.in_channels * shape.split
        if size * size * per_pixel * len(shape.kernel_sizes) <= self.macs:
            return ("merged",) * len(shape.kernel_sizes)
        return tuple(
            "dense" if g > 1 and k * k * per_pixel <= self.macs else "grouped"
            for k, g in zip(shape.kernel_sizes, shape.groups, strict=True)
        )


Rule = Nearest | Always | DenseUpTo
Table = Mapping[str, Rule]  # operation -> its measured rule
RULES = (Nearest, Always, DenseUpTo)

# Dense kernels of at most 2**21 multiply-adds per output pixel ran faster than the grouped
# convolution at every EPSANet-50 stage shape measured, larger ones slower
# (benchmarks/lab/experiments/psa_convs.py, results/<device>/psa_convs.json).
_PSA_PLAN = DenseUpTo(2**21)

TABLES: Mapping[str, Table] = MappingProxyType(
    {
        # The spatial convs' rows are written from benchmarks/results/nvidia-h200/modules.json
        # by `python -m benchmarks.lab.auto_table` (forward+backward of the gate at batch 128, bf16,
        # the four ResNet-50 stage sizes); the benchmarks' tests check that the two agree.
        "NVIDIA H200": MappingProxyType(
            {
                "cbam": Nearest(
                    ((3136, "shifts"), (784, "shifts"), (196, "shifts"), (49, "shifts"))
                ),
                "bam": Nearest(((3136, "conv"), (784, "im2col"), (196, "im2col"), (49, "im2col"))),
                "psa": _PSA_PLAN,
                # resnet50's training step: 3.5-4.9% faster with the space-to-depth stem.
                "stem": Always("space_to_depth"),
            }
        ),
        # Its modules suite timed the gates' library conv alone: no spatial-conv choice. The
        # stem's space-to-depth form made resnet50's training step 3.3% faster.
        "NVIDIA H100 80GB HBM3": MappingProxyType(
            {"psa": _PSA_PLAN, "stem": Always("space_to_depth")}
        ),
    }
)
_EMPTY: Table = MappingProxyType({})


def device_kind(device: jax.Device | None = None) -> str:
    """The kind of `device` (default: the default backend's first) as `TABLES` keys it."""
    device = jax.devices()[0] if device is None else device
    return " ".join(device.device_kind.split())


def device_table(kind: str | None = None) -> Table:
    """The measured rules of device kind `kind` (default: this device's); empty if unmeasured."""
    return TABLES.get(device_kind() if kind is None else kind, _EMPTY)


def choose(op: str, shape: object = 1, *, table: Table | None = None) -> str | tuple[str, ...]:
    """Which formulation computes `op` at `shape` (H * W for "cbam" and "bam", a `BranchShape`
    for "psa": one per branch): the rule of `table` (default: this device's measured table),
    else the library's default."""
    table = device_table() if table is None else table
    rule = table.get(op)
    return LIBRARY_DEFAULTS[op] if rule is None else rule.pick(shape)


def check_formulation(op: str, formulation: str | Rule) -> None:
    """Raise a ValueError naming `formulation=` unless it is "auto", a Rule, or one of `op`'s
    formulations."""
    choices = (AUTO, *FORMULATIONS[op])
    if not isinstance(formulation, RULES) and formulation not in choices:
        raise ValueError(
            f"formulation={formulation!r} is not supported for {op}; choose one of {list(choices)}"
        )


def resolve(op: str, formulation: str | Rule, shape: object = 1) -> str | tuple[str, ...]:
    """The formulation that computes `op` at `shape`: `formulation` itself when it names one,
    its pick when it is a Rule, this device's measured choice (`choose`) for "auto"."""
    check_formulation(op, formulation)
    if isinstance(formulation, RULES):
        return formulation.pick(shape)
    return choose(op, shape) if formulation == AUTO else formulation


Formulations = Mapping[str, str | Rule]  # operation -> its formulation, for a whole model


def check_formulations(formulations: Formulations) -> None:
    """Raise a ValueError naming the entry of a model's `formulations` that names no operation
    or no formulation of its operation."""
    for op, formulation in formulations.items():
        if op not in FORMULATIONS:
            raise ValueError(
                f"formulations: unknown operation {op!r}; choose among {list(FORMULATIONS)}"
            )
        check_formulation(op, formulation)
