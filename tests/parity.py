"""Helpers for comparing Flax modules with PyTorch reference modules."""

from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

from flax_attention.convert import load_torch_state_dict, to_torch_state_dict

TOL = 1e-5


def rel_l2(actual, expected) -> float:
    """||actual - expected|| / ||expected|| in float64."""
    a = np.asarray(actual, np.float64)
    e = np.asarray(expected, np.float64)
    assert a.shape == e.shape, f"shape {a.shape} != {e.shape}"
    return float(np.linalg.norm(a - e) / max(np.linalg.norm(e), 1e-30))


def assert_close(actual, expected, what: str, tol: float = TOL) -> None:
    err = rel_l2(actual, expected)
    assert err < tol, f"{what}: relative L2 error {err:.3e} >= {tol:.0e}"


def randomize_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights everywhere and non-trivial BatchNorm statistics (in place).

    Weights are scaled by 1/sqrt(fan_in) so activations stay O(1) and the sigmoids unsaturated,
    as in a trained network; saturated gates would make float32 rounding dominate comparisons.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            fan_in = p[0].numel() if p.ndim > 1 else 4
            p.copy_(torch.randn(p.shape, generator=gen) * fan_in**-0.5)
        for m in module.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.5)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) * 1.5 + 0.25)
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
    return module


def nchw(x_nhwc: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x_nhwc).transpose(0, 3, 1, 2)))


def nhwc(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy().transpose(0, 2, 3, 1)


def ported(flax_module: nnx.Module, torch_module: torch.nn.Module, layout: str) -> nnx.Module:
    """`flax_module` filled from `torch_module`'s state_dict."""
    load_torch_state_dict(flax_module, torch_module.state_dict(), layout=layout)
    return flax_module


def flax_grads(module: nnx.Module, x: np.ndarray, upstream: np.ndarray):
    """(output, d<out,g>/dx, parameter gradients as a PyTorch-named dict) for module(x)."""

    def loss(m, xx):
        y = m(xx)
        return jnp.sum(y * upstream), y

    grads = nnx.jit(nnx.grad(loss, argnums=(0, 1), has_aux=True))
    (g_module, g_x), y = grads(module, jnp.asarray(x))
    holder = nnx.clone(module)
    nnx.update(holder, g_module)
    return y, g_x, holder


def torch_grads(
    module: torch.nn.Module, x: torch.Tensor, upstream: np.ndarray, dtype=torch.float32
):
    """(output, input gradient NHWC, {name: grad}) of module(x) for an upstream gradient.

    With dtype=torch.float64 it runs on a float64 copy of the module: the exact reference.
    """
    module = copy.deepcopy(module).to(dtype)
    x = x.clone().to(dtype).requires_grad_(True)
    y = module(x)
    (y * nchw(upstream).to(dtype)).sum().backward()
    grads = {name: p.grad.numpy() for name, p in module.named_parameters()}
    return y, nhwc(x.grad), grads


def compare_grads(flax_holder: nnx.Module, grads32: dict, grads64: dict, layout: str) -> None:
    """Relative L2 per parameter gradient against PyTorch float32.

    Where PyTorch's own float32 gradient is further than TOL/2 from the float64 one (a
    cancelling sum, e.g. PSA's shared SE bias under the branch softmax), the bound is twice
    PyTorch's own error. A gradient that is analytically zero (the bias of a layer feeding a
    train-mode BatchNorm) is rounding noise on both sides; it is recognised by a float64 norm
    below 1e-5 of the global gradient norm, and then the Flax one must be below that bound too.
    """
    exported = to_torch_state_dict(flax_holder, layout=layout)
    assert set(grads32) <= set(exported), set(grads32) - set(exported)
    norms = {k: np.linalg.norm(g) for k, g in grads64.items()}
    zero_bound = 1e-5 * np.sqrt(sum(n**2 for n in norms.values()))
    for name, grad in grads32.items():
        if norms[name] < zero_bound:
            flax_norm = np.linalg.norm(np.asarray(exported[name], np.float64))
            assert flax_norm < zero_bound, f"grad of {name} should be ~0, has norm {flax_norm}"
        else:
            tol = max(TOL, 2 * rel_l2(grad, grads64[name]))
            assert_close(exported[name], grad, f"grad of {name}", tol)


def random_input(shape, seed: int = 1) -> np.ndarray:
    return np.asarray(jax.random.normal(jax.random.key(seed), shape, jnp.float32))
