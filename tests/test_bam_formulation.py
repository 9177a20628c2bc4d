"""BAM's polyphase form of the dilated 3x3 conv equals a plain dilated conv (forward, grads)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax

from flax_attention.layers.bam import phase_conv3x3
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
