"""The fused passes under every executor equal the XLA path, values and gradients.

On CPU: XLA on whole tensors (`xla_passes`), `pl.pallas_call` in the interpreter (`pallas`), the
same in Pallas' TPU-semantics interpreter, and the Mosaic GPU kernels in the Mosaic GPU
interpreter (register layouts aside, the kernel that runs on H100: grid, TMA pipeline, carries).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flax_attention import CBAM, SE, ChannelGate
from flax_attention.kernels import dispatch, passes
from flax_attention.kernels.executors import (
    MosaicGpu,
    PallasCall,
    Problem,
    Xla,
    mosaic_rows,
    mosaic_split,
    pallas_rows,
)

# (N, H, W, C): even, odd and non-square spatial sizes.
SHAPES = [(2, 4, 4, 32), (2, 5, 7, 32), (1, 3, 9, 48)]

BUILDERS = {
    "se": lambda c, impl: SE(c, 8, impl=impl, rngs=nnx.Rngs(0)),
    "channel_gate": lambda c, impl: ChannelGate(c, 8, impl=impl, rngs=nnx.Rngs(0)),
    "cbam": lambda c, impl: CBAM(c, 8, impl=impl, rngs=nnx.Rngs(0)),
    "cbam_timm": lambda c, impl: CBAM(c, 8, variant="timm", impl=impl, rngs=nnx.Rngs(0)),
}


def _randomize_bn(module: nnx.Module) -> None:
    """Non-zero spatial BatchNorm scale (the official init is 0, which hides its gradient)."""
    for _, node in nnx.iter_graph(module):
        if isinstance(node, nnx.BatchNorm):
            node.scale[...] = jnp.full(node.scale.shape, 1.3)
            node.bias[...] = jnp.full(node.bias.shape, -0.2)


def _run(build, shape, impl: str, train: bool):
    module = build(shape[-1], impl)
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


def _gpu_interpreter() -> MosaicGpu:
    try:  # public from jax 0.11 on; jax 0.10 keeps it private
        from jax.experimental.pallas.mosaic_gpu import InterpretParams
    except ImportError:
        from jax._src.pallas.mosaic_gpu.interpret.params import (
            InterpretGPUParams as InterpretParams,
        )
    return MosaicGpu(interpret=InterpretParams(), tma_stores=False)


def _tpu_interpreter() -> PallasCall:
    from jax.experimental.pallas import tpu as pltpu

    return PallasCall(lambda: {"interpret": pltpu.InterpretParams()})


@pytest.mark.parametrize("impl", ["xla_passes", "pallas"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", list(BUILDERS))
def test_fused_matches_xla(name, shape, impl):
    build = BUILDERS[name]
    train = name != "cbam_timm"  # one case in eval mode (running statistics)
    ref = _run(build, shape, "xla", train)
    got = _run(build, shape, impl, train)
    for a, b in zip(ref, got, strict=True):
        _close(a, b)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_mosaic_gpu_kernels_match_xla(name, monkeypatch):
    """The Mosaic GPU kernels, run by the Mosaic GPU interpreter, inside each module."""
    monkeypatch.setitem(dispatch.EXECUTORS, ("pallas", "cpu"), _gpu_interpreter)
    ref = _run(BUILDERS[name], (2, 3, 6, 256), "xla", train=True)
    got = _run(BUILDERS[name], (2, 3, 6, 256), "pallas", train=True)
    for a, b in zip(ref, got, strict=True):
        _close(a, b)


def _pass_inputs(shape, executor) -> dict[str, jax.Array]:
    """Inputs of every pass; the maxima come from `executor`'s own pools, as in the modules."""
    n, hw, c = shape
    k = iter(jax.random.split(jax.random.key(3), 8))
    inputs = {name: jax.random.normal(next(k), shape) for name in ("x", "dy")}
    inputs["x"] = jnp.round(inputs["x"] * 4) / 4  # ties in both max pools
    for name, size in (("cg", c), ("d_sum", c), ("d_chan_max", c)):
        inputs[name] = jax.nn.sigmoid(jax.random.normal(next(k), (n, size)))
    for name in ("sg", "d_pix_max", "d_pix_sum"):
        inputs[name] = jax.nn.sigmoid(jax.random.normal(next(k), (n, hw)))
    problem = Problem(*shape, jnp.float32)
    inputs["chan_max"] = executor(passes.CHANNEL_POOL, problem, x=inputs["x"])["max"]
    pix = executor(passes.SPATIAL_POOL, problem, x=inputs["x"], cg=inputs["cg"])
    inputs["pix_max"] = pix["max"]
    return inputs


EXECUTORS = {
    "pallas_interpret": lambda: dispatch.executor("pallas"),
    "pallas_tpu_interpret": _tpu_interpreter,
    "mosaic_gpu_interpret": _gpu_interpreter,
}
PASSES = [v for v in vars(passes).values() if isinstance(v, passes.Pass)]


@pytest.mark.parametrize("executor", list(EXECUTORS))
def test_every_pass_matches_xla(executor):
    shape = (2, 16, 256)
    executor = EXECUTORS[executor]()
    problem = Problem(*shape, jnp.float32)
    ref_inputs, inputs = _pass_inputs(shape, Xla()), _pass_inputs(shape, executor)
    _close(ref_inputs, inputs)
    assert len(PASSES) == 9
    for p in PASSES:
        names = (*p.tiles, *p.channels, *p.pixels)
        ref = Xla()(p, problem, **{k: ref_inputs[k] for k in names})
        got = executor(p, problem, **{k: inputs[k] for k in names})
        assert set(got) == {name for name, _ in p.outputs}, p.name
        _close(ref, got)


def test_ties_split_like_jax():
    """The max pools' gradients split ties evenly, as jnp.max's VJP does."""
    x = jnp.tile(jnp.arange(4.0).reshape(1, 2, 2, 1), (2, 1, 1, 32))  # every channel ties
    x = x.at[:, 1, 1].set(3.0)
    grads = []
    for impl in ("xla", "xla_passes", "pallas"):
        module = BUILDERS["cbam"](32, impl)
        _randomize_bn(module)
        module.eval()  # no running-statistics update inside jax.grad
        grads.append(jax.grad(lambda x, m=module: jnp.sum(m(x) ** 2))(x))
    _close(grads[0], grads[1])
    _close(grads[0], grads[2])


def test_impl_validation():
    with pytest.raises(ValueError, match="impl"):
        SE(32, impl="pallas_triton", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="pool_types"):
        CBAM(32, pool_types=("avg", "lp"), impl="pallas", rngs=nnx.Rngs(0))


def test_auto_falls_back_where_the_kernels_do_not_apply(monkeypatch):
    monkeypatch.setitem(dispatch.AUTO, "cpu", {"se": ((3136, "xla"), (16, "pallas"))})
    monkeypatch.setitem(dispatch.EXECUTORS, ("pallas", "cpu"), _gpu_interpreter)
    assert dispatch.resolve("auto", Problem(2, 16, 256, jnp.bfloat16), "se") == "pallas"
    assert dispatch.resolve("auto", Problem(2, 16, 64, jnp.bfloat16), "se") == "xla"  # C
    assert dispatch.resolve("auto", Problem(2, 2500, 256, jnp.bfloat16), "se") == "xla"  # H*W
    assert dispatch.resolve("auto", Problem(2, 16, 256, jnp.bfloat16), "cbam") == "xla"
    assert dispatch.resolve("xla_passes", Problem(2, 16, 64, jnp.bfloat16), "se") == "xla_passes"
    with pytest.raises(ValueError, match="C=64 is not a multiple of 256"):
        _gpu_interpreter()(
            passes.CHANNEL_POOL, Problem(2, 16, 64, jnp.float32), x=jnp.ones((2, 16, 64))
        )


def test_tile_geometry():
    assert pallas_rows(3136, 256, 2) == 64
    assert pallas_rows(49, 2048, 2) == 49  # no multiple of 8 divides 49: the whole axis
    assert mosaic_rows(3136, 2) == 32  # 16 KiB tiles of 256 bf16 channels
    assert mosaic_rows(49, 2) == 7
    assert mosaic_split(98, 128, 132) == 7  # divides 98, and 128 * 7 >= 2 * 132 blocks
