"""Each module gives the same result with and without jax.jit (chex variants)."""

from __future__ import annotations

import chex
import jax.numpy as jnp
import numpy as np
from absl.testing import parameterized
from flax import nnx

import flax_attention as fa

BUILDERS = {
    "se": lambda r: fa.SE(32, 4, rngs=r),
    "cbam": lambda r: fa.CBAM(32, 4, pool_types=("avg", "max", "lp", "lse"), rngs=r),
    "bam": lambda r: fa.BAM(32, 4, rngs=r),
    "psa": lambda r: fa.PSA(32, 32, groups=(1, 2, 4, 8), stride=2, reduction=2, rngs=r),
}


class JitVariantsTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(
        *[(f"{name}_{mode}", name, mode) for name in BUILDERS for mode in ("eval", "train")]
    )
    def test_same_output(self, name, mode):
        x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 9, 7, 32)), jnp.float32)

        def split_fresh():
            # A train-mode call updates the BatchNorm statistics it is given: one copy per call.
            module = BUILDERS[name](nnx.Rngs(0))
            getattr(module, mode)()
            return nnx.split(module)

        graphdef, state = split_fresh()

        def forward(state, x):
            model = nnx.merge(graphdef, state)
            y = model(x)
            return y, nnx.state(model)

        expected, expected_state = forward(state, x)
        actual, actual_state = self.variant(forward)(split_fresh()[1], x)
        np.testing.assert_allclose(actual, expected, rtol=2e-6, atol=2e-6)
        chex.assert_trees_all_close(actual_state, expected_state, rtol=2e-6, atol=2e-6)
