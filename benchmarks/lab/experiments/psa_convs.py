"""PSA's grouped branch convolutions in other formulations, timed forward+backward on one GPU.

For each PSA shape of EPSANet-50 (batch 128, NHWC, bf16; PSA input = the block's width,
branches (k, groups) = (3, 1), (5, 4), (7, 8), (9, 16), each to width/4 channels; every stage's
first block, strided from stage 2 on, and its other blocks, `blocks` of them):
- `grouped`: `lax.conv` with `feature_group_count` (the library's form);
- `dense`: the same kernel scattered into a block-diagonal dense kernel (groups x the FLOPs, the
  matrix units used at full width);
- `merged` (whole module's convs): the four branches as one dense width -> width convolution
  with every kernel zero-padded to 9x9 and centred (same sums);
- `auto` (whole module's convs): the library's choice per branch on this device (layers.policy).
The formulations are the library's (`flax_attention.layers.branch_convs`).
TFLOP/s count the grouped convolutions' useful FLOPs (2 * MACs, forward + both gradients).
Formulations measured on the H200 and removed from the library (their rows are in this
file's git history): `depthwise` (2026-11-30; a depthwise conv with channel multiplier out/g in
float32, then a sum over each group's inputs: 6-51x slower than `grouped`), `channels_first`
(2026-11-30; the grouped conv on NCHW: within 5% of `grouped` in 18 of 21 branch shapes, 1-4%
faster than the best of the others only for k=7 and 9 at 14x14 stride 2) and `blocked`
(2026-12-01, the committed result; each block-diagonal kernel cut into 3x3 blocks of taps, all
blocks of all branches one 3x3 conv with 23 x width/4 outputs, each branch the sum of its blocks'
outputs shifted: a wide matrix product for 0.64x the FLOPs of `merged`, but 1.4-2.5x slower than
`auto` for the whole module at every stride-1 shape, and in epsanet50_small's training step
2,320 img/s with it at stage 1 alone against 3,050 without).

`python -m benchmarks.lab.experiments.psa_convs [--quick] [--out DIR]` writes `<out>/psa_convs.json`
(by default benchmarks/lab/experiments/results/<device>/).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax
import jax.numpy as jnp

from benchmarks.device import device_slug
from benchmarks.results import error_text
from benchmarks.settings import Settings
from benchmarks.timing import jax_sync, random_inputs, time_fn
from flax_attention.layers import policy
from flax_attention.layers.branch_convs import FORMULATIONS, branch_convs

BRANCHES = ((3, 1), (5, 4), (7, 8), (9, 16))
# (stage, H=W of the input, width, stride, blocks of this shape in EPSANet-50), the shapes
# with the most blocks first: the first block of stages 2-4 strides.
STAGES = (
    (1, 56, 64, 1, 3),
    (3, 14, 256, 1, 5),
    (2, 28, 128, 1, 3),
    (4, 7, 512, 1, 2),
    (2, 56, 128, 2, 1),
    (3, 28, 256, 2, 1),
    (4, 14, 512, 2, 1),
)
BRANCH_FORMULATIONS = ("grouped", "dense")
BATCH, QUICK_BATCH = 128, 2
RESULTS = Path(__file__).resolve().parent / "results"


def branch_fn(formulation: str, stride: int, groups: int):
    return lambda x, k: FORMULATIONS[formulation](x, [(k, groups)], stride)[0]


def module_fn(formulation: str, stride: int, width: int):
    """All four branches; "auto" is the library's per-shape plan on this device."""
    sizes, groups = zip(*BRANCHES, strict=True)
    shape = policy.BranchShape(width, width // len(BRANCHES), sizes, groups)
    plans = policy.resolve("psa", formulation, shape)
    plans = (plans,) * len(BRANCHES) if isinstance(plans, str) else plans

    def f(x, kernels):
        branches = list(zip(kernels, groups, strict=True))
        return jnp.concatenate(branch_convs(x, branches, stride, plans), axis=-1)

    return f


def fwd_bwd(f):
    """jit of forward + gradients in x and the kernels under a random cotangent."""

    def g(x, kernels, dy):
        _, vjp = jax.vjp(f, x, kernels)
        return vjp(dy)

    return jax.jit(g)


def measure(f, x_shape, kernels, settings):
    xs = random_inputs(x_shape, jnp.bfloat16, settings.inputs)
    out = jax.eval_shape(f, xs[0], kernels)
    dys = random_inputs(out.shape, jnp.bfloat16, settings.inputs, seed=1)
    step = fwd_bwd(f)
    return time_fn(
        lambda x, dy: step(x, kernels, dy), list(zip(xs, dys, strict=True)), jax_sync, settings
    )


def useful_flops(n: int, h_out: int, width: int, branches) -> float:
    split = width // len(BRANCHES)
    macs = sum(k * k * (width // g) * split for k, g in branches)
    return 3 * 2 * macs * n * h_out * h_out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny shapes, few samples (CPU smoke)")
    p.add_argument("--out", type=Path, help="folder for psa_convs.json")
    args = p.parse_args(argv)
    args.out = args.out or RESULTS / device_slug(args.quick)
    settings = Settings.make(args.quick)
    if not args.quick:  # compiles dominate: 70 cases
        settings.samples, settings.sample_ms = 15, 10.0
    batch = QUICK_BATCH if args.quick else BATCH
    stages = ((1, 8, 64, 1, 3), (2, 8, 64, 2, 1)) if args.quick else STAGES
    meta = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "batch": batch}
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for stage, hw, width, stride, blocks in stages:
        split = width // len(BRANCHES)
        keys = jax.random.split(jax.random.key(stage), len(BRANCHES))
        kernels = [
            (jax.random.normal(key, (k, k, width // g, split)) * 0.05).astype(jnp.bfloat16)
            for key, (k, g) in zip(keys, BRANCHES, strict=True)
        ]
        h_out = -(-hw // stride)
        shape = (batch, hw, hw, width)
        cases = [("branch", f, i) for i in range(len(BRANCHES)) for f in BRANCH_FORMULATIONS]
        cases += [("module", f, None) for f in ("merged", "auto")]
        for scope, formulation, i in cases:
            row = {"stage": stage, "shape": list(shape), "stride": stride, "blocks": blocks}
            row.update(scope=scope, variant=formulation)
            if scope == "branch":
                k, g = BRANCHES[i]
                row.update(kernel=k, groups=g)
                f, ks, flops = branch_fn(formulation, stride, g), kernels[i], [BRANCHES[i]]
            else:
                f, ks, flops = module_fn(formulation, stride, width), kernels, BRANCHES
            try:
                t = measure(f, shape, ks, settings)
                row.update(t.as_dict())
                tflops = useful_flops(batch, h_out, width, flops) / (t.median_ms * 1e-3) / 1e12
                row["useful_tflop_s"] = round(tflops, 2)
            except Exception as e:
                row["error"] = error_text(e)
            rows.append(row)
            print(
                f"stage {stage} s{stride} {scope:6s} k={row.get('kernel', '-')} "
                f"g={row.get('groups', '-')}"
                f" {formulation:8s} {row.get('median_ms', float('nan')):8.3f} ms"
                f" {row.get('useful_tflop_s', float('nan')):7.1f} TFLOP/s {row.get('error', '')}",
                flush=True,
            )
            # after every row: a run cut short keeps what it measured
            (args.out / "psa_convs.json").write_text(json.dumps({**meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
