"""Host-sampled initialisers: Flax's distributions, deterministic per key, no XLA compilation."""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import stats

from flax_attention.initializers import fans, he_normal_fan_out, lecun_normal
from flax_attention.layers import BAM, CBAM, PSA, SE
from flax_attention.models import BasicBlock

CONV = (3, 3, 64, 96)
DENSE = (384, 160)

# (ours, Flax's, kernel shape)
PAIRS = [
    (he_normal_fan_out, nnx.initializers.variance_scaling(2.0, "fan_out", "normal"), CONV),
    (lecun_normal, nnx.initializers.lecun_normal(), DENSE),
    (lecun_normal, nnx.initializers.lecun_normal(), CONV),
]


@pytest.mark.parametrize(("ours", "flax_init", "shape"), PAIRS)
def test_same_distribution_as_flax(ours, flax_init, shape):
    mine = np.asarray(ours(jax.random.key(0), shape, jnp.float32)).ravel()
    reference = np.asarray(flax_init(jax.random.key(1), shape, jnp.float32)).ravel()
    assert mine.dtype == np.float32
    assert stats.ks_2samp(mine, reference).pvalue > 1e-3
    assert np.std(mine) == pytest.approx(np.std(reference), rel=0.02)
    assert abs(np.mean(mine)) < 5 * np.std(mine) / np.sqrt(mine.size)


def test_lecun_normal_is_truncated_at_two_standard_deviations():
    values = np.asarray(lecun_normal(jax.random.key(0), DENSE))
    untruncated_std = np.sqrt(1.0 / fans(DENSE)[0]) / 0.87962566103423978
    assert np.abs(values).max() <= 2 * untruncated_std * (1 + 1e-6)
    assert np.abs(values).max() > 1.9 * untruncated_std
    assert np.std(values) == pytest.approx(np.sqrt(1.0 / DENSE[0]), rel=0.02)


def test_deterministic_per_key_and_equal_under_jit_and_vmap():
    key, other = jax.random.key(3), jax.random.key(4)
    eager = he_normal_fan_out(key, CONV)
    np.testing.assert_array_equal(eager, he_normal_fan_out(key, CONV))
    assert not np.array_equal(eager, he_normal_fan_out(other, CONV))
    jitted = jax.jit(lambda k: he_normal_fan_out(k, CONV))(key)
    np.testing.assert_array_equal(jitted, eager)
    keys = jnp.stack([key, other])
    batched = jax.vmap(lambda k: lecun_normal(k, DENSE))(keys)
    np.testing.assert_array_equal(batched[1], lecun_normal(other, DENSE))
    abstract = jax.eval_shape(lambda k: lecun_normal(k, DENSE, jnp.bfloat16), key)
    assert abstract.shape == DENSE and abstract.dtype == jnp.bfloat16


def test_module_built_under_jit_equals_eager_build():
    def build():
        return BasicBlock(16, 24, 2, attention="cbam", rngs=nnx.Rngs(5))

    eager, jitted = nnx.state(build()), nnx.state(nnx.jit(build)())
    for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted), strict=True):
        np.testing.assert_array_equal(a, b)


def test_building_compiles_no_random_sampler(caplog):
    """Eager construction used to compile jax.random's samplers once per parameter shape."""
    with caplog.at_level(logging.WARNING), jax.log_compiles(True):
        SE(72, 8, rngs=nnx.Rngs(0))
        CBAM(72, 8, rngs=nnx.Rngs(0))
        BAM(72, 8, rngs=nnx.Rngs(0))
        PSA(80, 128, rngs=nnx.Rngs(0))
        BasicBlock(40, 56, 2, rngs=nnx.Rngs(0))
    compiled = [r.getMessage() for r in caplog.records if "XLA compilation of" in r.getMessage()]
    samplers = [m for m in compiled if "normal" in m or "uniform" in m or "random_bits" in m]
    assert not samplers, samplers
