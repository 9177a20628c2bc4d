"""Parity of SE, CBAM, BAM and PSA with PyTorch references (eval, train, gradients)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from flax import nnx
from parity import (
    assert_close,
    compare_grads,
    flax_grads,
    nchw,
    nhwc,
    ported,
    random_input,
    randomize_,
    torch_grads,
)

import flax_attention as fa
from flax_attention.convert import load_torch_state_dict, to_torch_state_dict
from flax_attention.reference import layers as ref


@dataclass(frozen=True)
class Case:
    name: str
    make_flax: Callable[[nnx.Rngs], nnx.Module]
    make_torch: Callable[[], torch.nn.Module]
    shape: tuple[int, int, int, int]  # NHWC input
    layout: str = "official"

    def __str__(self) -> str:
        return self.name


def _cases() -> list[Case]:
    cases = []
    for c, hw in ((64, (9, 7)), (256, (6, 8))):
        shape = (4, *hw, c)
        hidden = c // 16
        timm_se_hidden = max(8, int(c / 16 + 4) // 8 * 8)
        timm_cbam_hidden = max(1, round(c / 16))
        cases += [
            Case(f"se-senet-{c}", lambda r, c=c: fa.SE(c, bias=False, rngs=r),
                 lambda c=c, h=hidden: ref.SELayer(c, h, bias=False), shape),
            Case(f"se-caffe-{c}", lambda r, c=c: fa.SE(c, rngs=r),
                 lambda c=c, h=hidden: ref.SELayer(c, h, bias=True), shape),
            Case(f"se-timm-{c}", lambda r, c=c: fa.SE(c, rd_divisor=8, rngs=r),
                 lambda c=c, h=timm_se_hidden: ref.TimmSE(c, h), shape, "timm"),
            Case(f"cbam-{c}", lambda r, c=c: fa.CBAM(c, rngs=r),
                 lambda c=c: ref.CBAMRef(c), shape),
            Case(f"cbam-timm-{c}", lambda r, c=c: fa.CBAM(c, variant="timm", rngs=r),
                 lambda c=c, h=timm_cbam_hidden: ref.TimmCBAM(c, h), shape, "timm"),
            Case(f"bam-product-{c}", lambda r, c=c: fa.BAM(c, rngs=r),
                 lambda c=c: ref.BAMRef(c), shape),
            Case(f"bam-sum-{c}", lambda r, c=c: fa.BAM(c, combine="sum", rngs=r),
                 lambda c=c: ref.BAMRef(c, combine="sum"), shape),
            Case(f"psa-{c}", lambda r, c=c: fa.PSA(c, c, rngs=r),
                 lambda c=c: ref.PSARef(c, c), shape),
        ]  # fmt: skip
    cases += [
        Case("cbam-all-pools", lambda r: fa.CBAM(64, 8, 5, pool_types=("avg", "max", "lp", "lse"), rngs=r),
             lambda: ref.CBAMRef(64, 8, ("avg", "max", "lp", "lse"), k=5), (3, 5, 6, 64)),
        Case("cbam-lp-lse-no-spatial", lambda r: fa.CBAM(64, pool_types=("lp", "lse"), spatial=False, rngs=r),
             lambda: ref.CBAMRef(64, 16, ("lp", "lse"), no_spatial=True), (3, 5, 6, 64)),
        Case("channel-gate", lambda r: fa.ChannelGate(64, pool_types=("avg",), rngs=r),
             lambda: ref.CBAMChannelGate(64, 16, ("avg",)), (2, 4, 5, 64)),
        Case("spatial-gate", lambda r: fa.SpatialGate(3, rngs=r),
             lambda: ref.CBAMSpatialGate(3), (2, 4, 5, 64)),
        Case("bam-one-dilated-d2", lambda r: fa.BAM(64, 8, 2, num_dilated=1, rngs=r),
             lambda: ref.BAMRef(64, 8, num_dilated=1, dilation=2), (4, 11, 9, 64)),
        Case("psa-stride2-even", lambda r: fa.PSA(64, 64, stride=2, rngs=r),
             lambda: ref.PSARef(64, 64, stride=2), (2, 8, 10, 64)),
        Case("psa-stride2-odd", lambda r: fa.PSA(64, 64, stride=2, rngs=r),
             lambda: ref.PSARef(64, 64, stride=2), (2, 9, 7, 64)),
        Case("psa-256-stride2-odd", lambda r: fa.PSA(256, 256, stride=2, rngs=r),
             lambda: ref.PSARef(256, 256, stride=2), (2, 7, 5, 256)),
        Case("psa-two-branches-in-out", lambda r: fa.PSA(32, 64, (3, 5), (1, 2), rngs=r, reduction=4),
             lambda: _psa_two_branches(), (2, 6, 7, 32)),
    ]  # fmt: skip
    return cases


def _psa_two_branches() -> torch.nn.Module:
    module = ref.PSARef(32, 64, kernels=(3, 5), groups=(1, 2))
    module.se = ref.SEWeightModule(32, reduction=4)
    return module


CASES = _cases()


def _pair(case: Case, seed: int = 0):
    torch_module = randomize_(case.make_torch(), seed)
    flax_module = ported(case.make_flax(nnx.Rngs(seed)), torch_module, case.layout)
    return flax_module, torch_module


@pytest.mark.parametrize("case", CASES, ids=str)
def test_eval_forward(case: Case):
    flax_module, torch_module = _pair(case)
    flax_module.eval()
    torch_module.eval()
    x = random_input(case.shape)
    with torch.no_grad():
        expected = nhwc(torch_module(nchw(x)))
    assert_close(flax_module(x), expected, f"{case} eval output")


@pytest.mark.parametrize("case", CASES, ids=str)
def test_train_forward_and_running_stats(case: Case):
    flax_module, torch_module = _pair(case)
    flax_module.train()
    torch_module.train()
    x = random_input(case.shape, seed=2)
    with torch.no_grad():
        expected = nhwc(torch_module(nchw(x)))
    assert_close(flax_module(x), expected, f"{case} train output")
    exported = to_torch_state_dict(flax_module, layout=case.layout)
    for name, value in torch_module.state_dict().items():
        if "running" in name:
            assert_close(exported[name], value.numpy(), f"{case} {name} after one step")


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_gradients(case: Case, mode: str):
    flax_module, torch_module = _pair(case)
    getattr(flax_module, mode)()
    getattr(torch_module, mode)()
    x = random_input(case.shape, seed=3)
    upstream = _upstream(case)
    y_torch, gx_torch, gp_torch = torch_grads(torch_module, nchw(x), upstream)
    _, _, gp_exact = torch_grads(torch_module, nchw(x), upstream, dtype=torch.float64)
    y_flax, gx_flax, holder = flax_grads(flax_module, x, upstream)
    assert_close(y_flax, nhwc(y_torch), f"{case} output")
    assert_close(gx_flax, gx_torch, f"{case} input gradient")
    compare_grads(holder, gp_torch, gp_exact, case.layout)


def _upstream(case: Case) -> np.ndarray:
    torch_module = case.make_torch().eval()
    with torch.no_grad():
        out_shape = nhwc(torch_module(nchw(np.zeros(case.shape, np.float32)))).shape
    return random_input(out_shape, seed=4)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_state_dict_round_trip_is_exact(case: Case):
    flax_module, torch_module = _pair(case)
    exported = to_torch_state_dict(flax_module, layout=case.layout)
    source = {k: v.numpy() for k, v in torch_module.state_dict().items()}
    for name, value in exported.items():
        np.testing.assert_array_equal(value, source[name], err_msg=name)
    fresh = case.make_flax(nnx.Rngs(123))
    load_torch_state_dict(fresh, exported, layout=case.layout)
    for (path_a, a), (path_b, b) in zip(
        nnx.to_flat_state(nnx.state(fresh)), nnx.to_flat_state(nnx.state(flax_module)), strict=True
    ):
        assert path_a == path_b
        np.testing.assert_array_equal(a.get_value(), b.get_value(), err_msg=str(path_a))
    # PyTorch accepts what we export, strictly.
    target = case.make_torch()
    target.load_state_dict({k: torch.tensor(v) for k, v in exported.items()}, strict=True)


@pytest.mark.parametrize("dtype", [np.float32, "bfloat16"])
def test_spatial_pools_have_autodiffs_values_and_gradients(dtype):
    """CBAM's pools over C in one reduction: the values and gradients of jnp.mean and jnp.max
    (a tie shares the gradient evenly), as PyTorch's `mean(1)` and `amax(1)`; NaN propagates."""
    import jax
    import jax.numpy as jnp

    from flax_attention.layers.cbam import mean_and_max_over_channels

    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 4, 16)).astype(np.float32)
    x[0, 0, 0, [3, 9, 12]] = x[0, 0, 0].max() + 1.0  # a three-way tie
    x = jnp.asarray(x).astype(dtype)
    w_mean, w_max = (jnp.asarray(rng.standard_normal((2, 3, 4)), jnp.float32) for _ in range(2))
    mean, peak = mean_and_max_over_channels(x)
    assert mean.dtype == peak.dtype == jnp.float32
    np.testing.assert_array_equal(peak, x.max(-1).astype(jnp.float32))
    assert_close(mean, x.astype(jnp.float32).mean(-1), "mean", tol=1e-6)

    def loss(pools):
        def f(x):
            mean, peak = pools(x)
            return jnp.sum(mean * w_mean + peak * w_max)

        return f

    autodiff = loss(lambda x: (x.astype(jnp.float32).mean(-1), x.max(-1).astype(jnp.float32)))
    grad = jax.grad(loss(mean_and_max_over_channels))(x)
    assert grad.dtype == x.dtype
    tol = 1e-6 if dtype == np.float32 else 1e-2  # bf16 autodiff rounds each term; ours once
    assert_close(grad.astype(jnp.float32), jax.grad(autodiff)(x).astype(jnp.float32), "dx", tol)
    xt = torch.tensor(np.asarray(x, np.float32)).permute(0, 3, 1, 2).requires_grad_(True)
    pooled = torch.mean(xt, 1) * torch.tensor(np.asarray(w_mean))
    (pooled + torch.amax(xt, 1) * torch.tensor(np.asarray(w_max))).sum().backward()
    want = jnp.asarray(nhwc(xt.grad)).astype(x.dtype)  # torch's, rounded to x's dtype
    assert_close(grad.astype(jnp.float32), want.astype(jnp.float32), "dx vs torch", tol=1e-6)
    _, peak = mean_and_max_over_channels(x.at[1, 2, 3, 5].set(jnp.nan))
    assert jnp.isnan(peak[1, 2, 3])
