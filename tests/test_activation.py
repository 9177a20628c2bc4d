"""layers.common.relu (backward from its output) against jax.nn.relu."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax_attention.layers.common import relu


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_values_and_gradients_are_jax_nn_relus(dtype):
    """Including at 0, -0, the smallest normal numbers of both signs, infinities and NaN (XLA
    flushes subnormals to zero, in both)."""
    tiny = float(jnp.finfo(dtype).tiny)
    special = [0.0, -0.0, tiny, -tiny, np.inf, -np.inf, np.nan, 1.5, -1.5]
    rng = np.random.default_rng(0)
    x = jnp.asarray(np.concatenate([special, rng.standard_normal(55)]), dtype)
    dy = jnp.asarray(rng.standard_normal(x.shape) + 2.0, dtype)
    y, vjp = jax.vjp(relu, x)
    y_ref, vjp_ref = jax.vjp(jax.nn.relu, x)
    (dx,), (dx_ref,) = vjp(dy), vjp_ref(dy)
    assert y.dtype == dx.dtype == dtype
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(y_ref, np.float32))
    np.testing.assert_array_equal(np.asarray(dx, np.float32), np.asarray(dx_ref, np.float32))
    assert float(dx[2]) == float(dy[2]) and float(dx[0]) == 0.0  # tiny passes; 0 does not
