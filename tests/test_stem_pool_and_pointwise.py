"""The stem's max pool (taps VJP) against PyTorch, and 1x1 convs as matrix products."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from parity import assert_close

from flax_attention.kernels.max_pool import max_pool_3x3_s2, max_pool_3x3_s2_reference
from flax_attention.layers.common import PointwiseConv, conv2d, pointwise_conv

SHAPES = [(2, 8, 8, 3), (2, 9, 7, 3), (1, 5, 6, 2), (1, 2, 3, 4), (2, 16, 16, 5)]


def _inputs(shape, kind: str, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    if kind == "ties":  # rectified and rounded: most windows hold several equal maxima
        x = np.maximum(np.round(x), 0)
    if kind == "nan":
        x.flat[:: max(1, x.size // 7)] = np.nan
    return x


def _torch_pool(x: np.ndarray, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    xt = torch.tensor(x).permute(0, 3, 1, 2).requires_grad_()
    y = torch.nn.functional.max_pool2d(xt, 3, 2, 1)
    y.backward(torch.tensor(g).permute(0, 3, 1, 2))
    return y.detach().permute(0, 2, 3, 1).numpy(), xt.grad.permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("kind", ["normal", "ties", "nan"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_max_pool_matches_torch_values_and_gradient(shape, kind):
    x = _inputs(shape, kind, seed=sum(shape))
    y, vjp = jax.vjp(max_pool_3x3_s2, jnp.asarray(x))
    g = np.random.default_rng(1).standard_normal(y.shape).astype(np.float32)
    y_ref, dx_ref = _torch_pool(x, g)
    np.testing.assert_array_equal(np.asarray(y), y_ref)
    np.testing.assert_array_equal(np.asarray(vjp(jnp.asarray(g))[0]), dx_ref)


@pytest.mark.parametrize("shape", SHAPES[:3], ids=str)
def test_max_pool_gradient_matches_xla_reference(shape):
    x = jnp.asarray(_inputs(shape, "ties", seed=3))
    loss = lambda pool: lambda v: jnp.sum(jnp.sin(pool(v)))  # noqa: E731
    got = jax.grad(loss(max_pool_3x3_s2))(x)
    want = jax.grad(loss(max_pool_3x3_s2_reference))(x)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("size", [7, 8])
def test_pointwise_conv_is_the_1x1_conv(stride, size):
    rngs = nnx.Rngs(0)
    fast = pointwise_conv(6, 5, stride=stride, rngs=rngs)
    conv = conv2d(6, 5, 1, stride=stride, rngs=nnx.Rngs(1))
    assert isinstance(fast, PointwiseConv) and isinstance(fast, nnx.Conv)
    conv.kernel[...] = fast.kernel[...]
    x = jax.random.normal(jax.random.key(2), (2, size, size, 6))

    def loss(module, v):
        return jnp.sum(jnp.cos(module(v)))

    y_fast, y_conv = fast(x), conv(x)
    assert y_fast.shape == y_conv.shape
    assert_close(y_fast, y_conv, "forward")
    g_fast = nnx.grad(loss, argnums=(0, 1))(fast, x)
    g_conv = nnx.grad(loss, argnums=(0, 1))(conv, x)
    assert_close(g_fast[0].kernel[...], g_conv[0].kernel[...], "kernel gradient")
    assert_close(g_fast[1], g_conv[1], "input gradient")
