"""The Pallas kernels (interpret mode on CPU) equal the XLA path, values and gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flax_attention import CBAM, SE, ChannelGate
from flax_attention.kernels import dispatch, tiles

# (N, H, W, C): even, odd and non-square spatial sizes.
SHAPES = [(2, 4, 4, 32), (2, 5, 7, 32), (1, 3, 9, 48)]

BUILDERS = {
    "se": lambda impl: SE(32, 8, impl=impl, rngs=nnx.Rngs(0)),
    "channel_gate": lambda impl: ChannelGate(32, 8, impl=impl, rngs=nnx.Rngs(0)),
    "cbam": lambda impl: CBAM(32, 8, impl=impl, rngs=nnx.Rngs(0)),
    "cbam_timm": lambda impl: CBAM(32, 8, variant="timm", impl=impl, rngs=nnx.Rngs(0)),
}


def _randomize_bn(module: nnx.Module) -> None:
    """Non-zero spatial BatchNorm scale (the official init is 0, which hides its gradient)."""
    for _, node in nnx.iter_graph(module):
        if isinstance(node, nnx.BatchNorm):
            node.scale[...] = jnp.full(node.scale.shape, 1.3)
            node.bias[...] = jnp.full(node.bias.shape, -0.2)


def _run(build, shape, impl: str, train: bool):
    module = build(impl)
    if shape[-1] != 32:
        module = type(module)(shape[-1], 8, impl=impl, rngs=nnx.Rngs(0))
    _randomize_bn(module)
    module.train() if train else module.eval()
    graphdef, state = nnx.split(module)
    x = jax.random.normal(jax.random.key(1), shape)
    dy = jax.random.normal(jax.random.key(2), shape)

    def apply(state, x):
        m = nnx.merge(graphdef, state)
        return m(x), nnx.state(m, nnx.BatchStat)

    (y, stats), vjp = jax.vjp(apply, state, x)
    d_state, dx = vjp((dy, jax.tree.map(jnp.zeros_like, stats)))
    return y, dx, d_state, stats


def _close(a, b, rtol=2e-5):
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        scale = float(jnp.max(jnp.abs(u))) + 1e-6
        np.testing.assert_allclose(np.asarray(v), np.asarray(u), rtol=0, atol=rtol * scale)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", list(BUILDERS))
def test_kernel_matches_xla(name, shape):
    build = BUILDERS[name]
    train = name != "cbam_timm"  # one case in eval mode (running statistics)
    ref = _run(build, shape, "xla", train)
    got = _run(build, shape, "pallas", train)
    for a, b in zip(ref, got, strict=True):
        _close(a, b)


def test_ties_split_like_jax():
    """The max pools' gradients split ties evenly, as jnp.max's VJP does."""
    x = jnp.tile(jnp.arange(4.0).reshape(1, 2, 2, 1), (2, 1, 1, 32))  # every channel ties
    x = x.at[:, 1, 1].set(3.0)
    module = CBAM(32, 8, impl="xla", rngs=nnx.Rngs(0))
    _randomize_bn(module)
    kernel = CBAM(32, 8, impl="pallas", rngs=nnx.Rngs(0))
    _randomize_bn(kernel)
    module.eval(), kernel.eval()  # no running-statistics update inside jax.grad
    grads = [jax.grad(lambda x, m=m: jnp.sum(m(x) ** 2))(x) for m in (module, kernel)]
    _close(grads[0], grads[1])


def test_tpu_interpreter_runs_the_tiles():
    """The tiling lowers in Pallas' TPU-semantics interpreter (block shapes, grid)."""
    pltpu = pytest.importorskip("jax.experimental.pallas.tpu")
    x = jax.random.normal(jax.random.key(0), (2, 16, 128))
    cg = jax.random.uniform(jax.random.key(1), (2, 128))
    t = tiles.Tiling(2, 16, 128, jnp.float32, interpret=pltpu.InterpretParams())
    s, m = tiles.channel_pool(t, "pallas", x)
    y = tiles.apply_gates(t, "pallas", x, cg, None)
    _close(x.sum(1), s)
    _close(x.max(1), m)
    _close(x * cg[:, None], y)


def test_impl_validation():
    with pytest.raises(ValueError, match="impl"):
        SE(32, impl="cuda", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="pool_types"):
        CBAM(32, pool_types=("avg", "lp"), impl="pallas", rngs=nnx.Rngs(0))
    assert dispatch.resolve("auto") == "xla"  # CPU: XLA


def test_tile_rows():
    assert tiles.tile_rows(3136, 256, 2) == 64
    assert tiles.tile_rows(49, 2048, 2) == 49  # no multiple of 8 divides 49: the whole axis
