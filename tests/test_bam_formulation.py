"""BAM's formulations: the polyphase form of the dilated 3x3 conv equals a plain dilated conv,
and `attend's backward equals autodiff of its formula (forward, grads)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax

from flax_attention.layers.bam import COMBINES, attend, phase_conv3x3
from flax_attention.layers.common import conv2d


def dilated_reference(x: jax.Array, kernel: jax.Array, bias: jax.Array, d: int) -> jax.Array:
    """The plain dilated conv (NHWC x HWIO, padding d, dilation d) plus bias."""
    y = lax.conv_general_dilated(
        x,
        kernel,
        window_strides=(1, 1),
        padding=((d, d), (d, d)),
        rhs_dilation=(d, d),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=lax.Precision.HIGHEST,
    )
    return y + bias


def rel_err(a: jax.Array, b: jax.Array) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("d", [2, 4])
@pytest.mark.parametrize("hw", [(8, 8), (9, 7), (5, 6), (3, 3)])
def test_phase_conv_matches_dilated(d: int, hw: tuple[int, int]) -> None:
    conv = conv2d(6, 5, 3, dilation=d, bias=True, rngs=nnx.Rngs(0))
    conv.precision = lax.Precision.HIGHEST
    kx, kb, kd = jax.random.split(jax.random.key(d * 100 + hw[0] * 10 + hw[1]), 3)
    x = jax.random.normal(kx, (2, *hw, 6), jnp.float32)
    conv.bias[...] = jax.random.normal(kb, (5,), jnp.float32)
    dy = jax.random.normal(kd, (2, *hw, 5), jnp.float32)
    graphdef, params = nnx.split(conv)

    def ours(x, params):
        return phase_conv3x3(nnx.merge(graphdef, params), x)

    def ref(x, params):
        return dilated_reference(x, params["kernel"][...], params["bias"][...], d)

    y, vjp = jax.vjp(ours, x, params)
    y_ref, vjp_ref = jax.vjp(ref, x, params)
    assert y.shape == y_ref.shape == (2, *hw, 5)
    assert rel_err(y, y_ref) < 1e-6
    grads = jax.tree.leaves(vjp(dy))
    grads_ref = jax.tree.leaves(vjp_ref(dy))
    assert len(grads) == len(grads_ref) == 3
    for g, g_ref in zip(grads, grads_ref, strict=True):
        assert rel_err(g, g_ref) < 1e-6


@pytest.mark.parametrize("combine", ["product", "sum"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_attend_has_the_values_and_gradients_of_autodiff(combine: str, dtype) -> None:
    """dx, d_channel and d_spatial of `attend` (the attention recomputed in the backward) equal
    autodiff of `x * (1 + sigmoid(combine(c, s)))` rounded as the forward rounds it."""
    kx, kc, ks, kd = jax.random.split(jax.random.key(3), 4)
    x = jax.random.normal(kx, (2, 5, 6, 8), jnp.float32).astype(dtype)
    c = 2.0 * jax.random.normal(kc, (2, 1, 1, 8), jnp.float32)
    s = 2.0 * jax.random.normal(ks, (2, 5, 6, 1), jnp.float32)
    dy = jax.random.normal(kd, x.shape, jnp.float32).astype(dtype)

    def formula(x, c, s):
        return x * (1.0 + jax.nn.sigmoid(COMBINES[combine](c, s))).astype(dtype)

    y, vjp = jax.vjp(lambda x, c, s: attend(x, c, s, combine), x, c, s)
    y_ref, vjp_ref = jax.vjp(formula, x, c, s)
    assert y.dtype == dtype and bool((y == y_ref).all())
    tol = 1e-6 if dtype == jnp.float32 else 1e-2  # autodiff multiplies dy * x in bf16
    for g, g_ref in zip(vjp(dy), vjp_ref(dy), strict=True):
        assert g.dtype == g_ref.dtype and g.shape == g_ref.shape
        assert rel_err(g.astype(jnp.float32), g_ref.astype(jnp.float32)) < tol
