"""Faster formulations compute what the plain ones do: the ResNet stem, PSA's branch convs,
CBAM's and BAM's spatial convs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from parity import assert_close

from flax_attention.architectures.stem import StemConv, space_to_depth
from flax_attention.layers import BAM, CBAM, PSA, policy
from flax_attention.layers.branch_convs import FORMULATIONS, branch_convs
from flax_attention.layers.common import conv_nhwc
from flax_attention.layers.policy import BranchShape, DenseUpTo, Nearest, resolve
from flax_attention.layers.tap_convs import FORMS
from flax_attention.models import create_model

H200, H100, A100 = "NVIDIA H200", "NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB"


def _normal(seed: int, shape) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


@pytest.mark.parametrize("hw", [(32, 32), (33, 30), (9, 8)])
def test_space_to_depth_stem_equals_direct_conv(hw):
    x, kernel = _normal(0, (2, *hw, 3)), _normal(1, (7, 7, 3, 8))

    def loss(fn):
        return lambda x, k: jnp.sum(fn(x, k, 2) * _normal(2, fn(x, k, 2).shape))

    assert_close(space_to_depth(x, kernel, 2), conv_nhwc(x, kernel, 2), "output", tol=1e-6)
    got = jax.grad(loss(space_to_depth), argnums=(0, 1))(x, kernel)
    want = jax.grad(loss(conv_nhwc), argnums=(0, 1))(x, kernel)
    assert_close(got[0], want[0], "dx", tol=1e-6)
    assert_close(got[1], want[1], "dkernel", tol=1e-6)


def test_stem_module_keeps_the_hwio_kernel():
    stem = StemConv(3, 8, rngs=nnx.Rngs(0))
    assert stem.kernel[...].shape == (7, 7, 3, 8)
    x = _normal(3, (1, 16, 16, 3))
    assert_close(stem(x), conv_nhwc(x, stem.kernel[...], 2), "module output", tol=1e-6)
    blocked = StemConv(3, 8, rngs=nnx.Rngs(0), formulation="space_to_depth")
    assert_close(blocked(x), stem(x), "space_to_depth formulation", tol=1e-6)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("formulation", sorted(FORMULATIONS))
def test_branch_formulations_equal_grouped_convs(formulation: str, stride: int):
    width, split = 32, 8
    spec = ((3, 1), (5, 2), (7, 4), (9, 8))
    branches = [(_normal(10 + i, (k, k, width // g, split)), g) for i, (k, g) in enumerate(spec)]
    x = _normal(4, (2, 11, 10, width))

    def loss(fn_name):
        def f(x, kernels):
            bs = [(k, g) for k, (_, g) in zip(kernels, branches, strict=True)]
            outs = FORMULATIONS[fn_name](x, bs, stride)
            return sum(jnp.sum(o * _normal(20 + i, o.shape)) for i, o in enumerate(outs))

        return f

    kernels = [k for k, _ in branches]
    want_out = FORMULATIONS["grouped"](x, branches, stride)
    for i, (got, want) in enumerate(
        zip(FORMULATIONS[formulation](x, branches, stride), want_out, strict=True)
    ):
        assert_close(got, want, f"branch {i}", tol=1e-6)
    got = jax.grad(loss(formulation), argnums=(0, 1))(x, kernels)
    want = jax.grad(loss("grouped"), argnums=(0, 1))(x, kernels)
    assert_close(got[0], want[0], "dx", tol=1e-6)
    for i in range(len(spec)):
        assert_close(got[1][i], want[1][i], f"dkernel {i}", tol=1e-6)


def test_plan_on_epsanet50_stage_shapes():
    sizes, groups = (3, 5, 7, 9), (1, 4, 8, 16)
    plan = DenseUpTo(2**21).pick
    assert plan(BranchShape(64, 16, sizes, groups)) == ("merged",) * 4
    assert plan(BranchShape(128, 32, sizes, groups)) == ("merged",) * 4
    assert plan(BranchShape(256, 64, sizes, groups)) == ("grouped", "dense", "dense", "dense")
    want = ("grouped", "dense", "grouped", "grouped")
    assert plan(BranchShape(512, 128, sizes, groups)) == want


def test_mixed_plan_matches_grouped():
    width, split = 32, 8
    branches = [
        (_normal(30 + i, (k, k, width // g, split)), g) for i, (k, g) in enumerate(((3, 1), (5, 4)))
    ]
    x = _normal(5, (1, 8, 8, width))
    mixed = branch_convs(x, branches, 1, ("grouped", "dense"))
    for got, want in zip(mixed, FORMULATIONS["grouped"](x, branches, 1), strict=True):
        assert_close(got, want, "mixed plan", tol=1e-6)


@pytest.mark.parametrize("formulation", sorted(FORMULATIONS))
def test_psa_module_is_the_same_under_every_formulation(formulation: str):
    kw = dict(stride=2, reduction=4, groups=(1, 2, 4, 8))
    x = _normal(6, (2, 9, 9, 32))
    base = PSA(32, 32, **kw, formulation="grouped", rngs=nnx.Rngs(0))
    other = PSA(32, 32, **kw, formulation=formulation, rngs=nnx.Rngs(0))
    assert_close(other(x), base(x), f"PSA with {formulation}", tol=1e-6)


def test_psa_rejects_unknown_formulation():
    with pytest.raises(ValueError, match="formulation='winograd'"):
        PSA(32, 32, groups=(1, 2, 4, 8), reduction=4, formulation="winograd", rngs=nnx.Rngs(0))


def _dilated_conv(x: jax.Array, kernel: jax.Array, d: int) -> jax.Array:
    """The library conv: NHWC x HWIO, stride 1, padding d*(k-1)//2, dilation d."""
    pad = d * (kernel.shape[0] - 1) // 2
    return jax.lax.conv_general_dilated(
        x,
        kernel,
        (1, 1),
        ((pad, pad), (pad, pad)),
        rhs_dilation=(d, d),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=jax.lax.Precision.HIGHEST,
    )


@pytest.mark.parametrize("form", ["shifts", "im2col"])
@pytest.mark.parametrize(
    "k, cin, cout, d, hw",
    [(7, 2, 1, 1, (9, 7)), (3, 2, 3, 2, (5, 6)), (3, 6, 5, 4, (5, 6)), (1, 8, 1, 1, (3, 4))],
)
def test_tap_convs_equal_the_library_conv(form: str, k, cin, cout, d, hw):
    """Every tap formulation (elementwise with its own VJP for narrow convs, per-tap products
    for 6 and 8 input channels) gives the library conv's output and gradients, dilated and odd
    sizes included."""
    fn = FORMS[form]
    x, kernel = _normal(30, (2, *hw, cin)), _normal(31, (k, k, cin, cout))
    dy = _normal(32, (2, *hw, cout))
    assert_close(fn(x, kernel, d), _dilated_conv(x, kernel, d), "output", tol=1e-6)
    got = jax.grad(lambda x, w: jnp.sum(fn(x, w, d) * dy), argnums=(0, 1))(x, kernel)
    want = jax.grad(lambda x, w: jnp.sum(_dilated_conv(x, w, d) * dy), argnums=(0, 1))(x, kernel)
    assert_close(got[0], want[0], "dx", tol=1e-6)
    assert_close(got[1], want[1], "dkernel", tol=1e-6)


@pytest.mark.parametrize("form", ["shifts", "im2col", "auto"])
@pytest.mark.parametrize("gate", ["cbam", "bam"])
def test_gates_are_the_same_under_every_spatial_conv(gate: str, form: str, monkeypatch):
    """CBAM's and BAM's spatial convs by taps: same parameters, output, gradients (params
    and x) and BatchNorm statistics as the library convs, training mode, float32."""
    build = {
        "cbam": lambda **kw: CBAM(32, 4, **kw),
        "bam": lambda **kw: BAM(32, 4, dilation=2, **kw),
    }[gate]
    if form == "auto":  # As on an H200, where the 8x8 input resolves to a tap formulation.
        monkeypatch.setattr(policy, "device_kind", lambda: H200)
        assert resolve(gate, "auto", 8 * 8) in ("shifts", "im2col")
    x = _normal(41, (2, 8, 8, 32) if form == "auto" else (2, 9, 7, 32))
    base = build(rngs=nnx.Rngs(0), formulation="conv")
    other = build(rngs=nnx.Rngs(0), formulation=form)
    base_state, other_state = nnx.state(base), nnx.state(other)
    assert jax.tree.map(jnp.shape, base_state) == jax.tree.map(jnp.shape, other_state)
    for module in (base, other):
        module.train()
    dy = _normal(40, x.shape)

    def grads(module):
        graphdef, state = nnx.split(module)

        def loss(state, x):
            return jnp.sum(nnx.merge(graphdef, state)(x) * dy)

        return jax.jit(jax.grad(loss, argnums=(0, 1)))(state, x)

    assert_close(other(x), base(x), f"{gate} output", tol=1e-6)
    for got, want in zip(
        jax.tree.leaves(nnx.state(other)), jax.tree.leaves(nnx.state(base)), strict=True
    ):
        # BatchNorm statistics over 128 values: float32 rounding, which the code generation
        # (tests/conftest.py: LLVM unoptimised) moves to about 1.2e-6.
        assert_close(got, want, f"{gate} state after a training call", tol=2e-6)
    got, want = grads(other), grads(base)
    assert_close(got[1], want[1], f"{gate} dx", tol=1e-6)
    # As one vector: the biases before a BatchNorm have gradients that are 0 up to rounding.
    flat = lambda tree: jnp.concatenate([a.ravel() for a in jax.tree.leaves(tree)])  # noqa: E731
    assert_close(flat(got[0]), flat(want[0]), f"{gate} dparams", tol=1e-6)


def test_gates_reject_unknown_formulation():
    with pytest.raises(ValueError, match="formulation='fft'"):
        CBAM(32, 4, formulation="fft", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="formulation='fft'"):
        BAM(32, 4, formulation="fft", rngs=nnx.Rngs(0))


def test_auto_picks_the_measured_fastest_by_device_kind_and_size(monkeypatch):
    """`auto` takes the H200 row's entry nearest in H*W there; the H100's row and any
    unmeasured device (an A100, the CPU) get the library conv."""
    for kind in (H100, A100, "cpu"):
        monkeypatch.setattr(policy, "device_kind", lambda kind=kind: kind)
        assert [resolve("cbam", "auto", s * s) for s in (56, 28, 14, 7)] == ["conv"] * 4
    assert resolve("cbam", "shifts", 56 * 56) == "shifts"
    monkeypatch.setattr(policy, "device_kind", lambda: H200)
    for gate in ("cbam", "bam"):
        measured = dict(policy.TABLES[H200][gate].rows)
        assert [resolve(gate, "auto", s * s) for s in (56, 28, 14, 7)] == [
            measured[s * s] for s in (56, 28, 14, 7)
        ]
        assert resolve(gate, "auto", 8 * 6) == measured[49]  # 48 px: nearest to 7x7
        assert resolve(gate, "auto", 112 * 112) == measured[3136]


def test_device_kinds_are_separate_rows_and_unmeasured_ones_get_the_library_defaults():
    """Each op's choice follows its device's own row: H200 choices never reach an H100, an
    A100 or the CPU, which take the library's default where nothing was measured."""
    epsa = BranchShape(256, 64, (3, 5, 7, 9), (1, 4, 8, 16))
    asked = lambda kind: [  # noqa: E731
        policy.choose(op, shape, table=policy.device_table(kind))
        for op, shape in (("cbam", 56 * 56), ("bam", 28 * 28), ("psa", epsa), ("stem", 1))
    ]
    planned = ("grouped", "dense", "dense", "dense")
    assert asked(H200) == ["shifts", "im2col", planned, "space_to_depth"]
    assert asked(H100) == ["conv", "conv", planned, "space_to_depth"]
    assert asked(A100) == asked("cpu") == ["conv", "conv", "grouped", "direct"]


def test_device_kind_is_normalised(monkeypatch):
    class Device:
        device_kind = "  NVIDIA   H100 80GB HBM3 "

    assert policy.device_kind(Device()) == H100


def test_the_tables_are_immutable():
    with pytest.raises(TypeError):
        policy.TABLES["NVIDIA A100-SXM4-80GB"] = policy.TABLES[H200]  # type: ignore[index]
    with pytest.raises(TypeError):
        policy.TABLES[H200]["cbam"] = Nearest(((49, "conv"),))  # type: ignore[index]
    with pytest.raises(AttributeError):
        policy.TABLES[H200]["cbam"].rows = ()  # type: ignore[misc]


def test_an_explicit_rule_picks_per_size_without_touching_the_tables():
    """Experiments pass a per-size rule as the formulation; the tables stay as they were."""
    rule = Nearest(((64, "im2col"), (16, "shifts")))
    gate = CBAM(32, 4, formulation=rule, rngs=nnx.Rngs(0)).spatial_gate
    assert resolve("cbam", gate.formulation, 8 * 8) == "im2col"
    assert resolve("cbam", gate.formulation, 4 * 4) == "shifts"
    x = _normal(3, (2, 8, 8, 32))
    base = CBAM(32, 4, formulation="conv", rngs=nnx.Rngs(0))
    assert_close(CBAM(32, 4, formulation=rule, rngs=nnx.Rngs(0))(x), base(x), "rule", tol=1e-6)


def test_create_model_takes_the_formulation_of_each_operation():
    """`create_model(..., formulations={op: formulation})` reaches the stem, every CBAM and
    BAM gate and every PSA; unnamed ops stay "auto"; an unknown op or formulation is refused."""
    build = lambda name, **kw: nnx.eval_shape(lambda: create_model(name, **kw))  # noqa: E731
    model = build("cbam_resnet18", formulations={"cbam": "shifts", "stem": "space_to_depth"})
    assert model.conv1.formulation == "space_to_depth"
    gates = [block.attention.spatial_gate for stage in model.stages for block in stage]
    assert {gate.formulation for gate in gates} == {"shifts"}
    bam = build("bam_resnet18", formulations={"bam": "im2col"})
    assert {att.spatial.formulation for att in bam.stage_attention} == {"im2col"}
    assert build("bam_resnet18").stage_attention[0].spatial.formulation == "auto"
    epsa = build("epsanet50_small", formulations={"psa": "dense"})
    assert {block.conv2.formulations for stage in epsa.stages for block in stage} == {
        ("dense",) * 4
    }
    with pytest.raises(ValueError, match="formulations: unknown operation 'se'"):
        build("cbam_resnet18", formulations={"se": "conv"})
    with pytest.raises(ValueError, match="formulation='merged' is not supported for cbam"):
        build("cbam_resnet18", formulations={"cbam": "merged"})
