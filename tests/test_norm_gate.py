"""BatchNorm + a channel gate (SE, CBAM's) + CBAM's spatial gate as one custom VJP
(layers.norm_gate) against the modules composed: alone, across pmap replicas and inside
residual blocks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from parity import assert_close

from flax_attention.layers import SE, BatchNorm, ChannelGate, SpatialGate
from flax_attention.layers.norm_gate import batch_norm_channel_gate
from flax_attention.models import blocks
from flax_attention.models.blocks import BasicBlock, Bottleneck

C = 32


def _norm_and_gate(seed: int, bias: bool = True, axis_name: str | None = None, pools=None):
    """A BatchNorm with scales of both signs, biases and running statistics, and an SE (or a
    CBAM ChannelGate with `pools`)."""
    rng = np.random.default_rng(seed)
    norm = BatchNorm(C, axis_name=axis_name, rngs=nnx.Rngs(seed))
    sign = np.where(np.arange(C) % 3 == 0, -1.0, 1.0)
    norm.scale[...] = jnp.asarray(rng.uniform(0.5, 1.5, C) * sign, jnp.float32)
    norm.bias[...] = jnp.asarray(rng.standard_normal(C), jnp.float32)
    norm.mean[...] = jnp.asarray(rng.standard_normal(C), jnp.float32)
    norm.var[...] = jnp.asarray(rng.uniform(0.5, 2.0, C), jnp.float32)
    if pools is not None:
        return norm, ChannelGate(C, 4, pool_types=pools, rngs=nnx.Rngs(seed + 1))
    return norm, SE(C, 4, bias=bias, rngs=nnx.Rngs(seed + 1))


def _spatial_gate(seed: int, variant: str = "official", axis_name: str | None = None):
    """CBAM's spatial gate with running statistics away from their initial values."""
    spatial = SpatialGate(variant=variant, rngs=nnx.Rngs(seed))
    spatial.bn.axis_name = axis_name
    spatial.bn.mean[...] = jnp.full((1,), 0.3, jnp.float32)
    spatial.bn.var[...] = jnp.full((1,), 1.7, jnp.float32)
    spatial.bn.scale[...] = jnp.full((1,), -1.3, jnp.float32)
    return spatial


def _data(seed: int, shape=(4, 5, 6, C)):
    """Inputs with per-channel offsets and scales (the statistics matter), and a cotangent."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape) * rng.uniform(0.5, 3.0, shape[-1])
    x += 4.0 * rng.standard_normal(shape[-1])
    return jnp.asarray(x, jnp.float32), jnp.asarray(rng.standard_normal(shape), jnp.float32)


def _value_and_grads(fn, norm, gate, x, dy):
    def loss(norm, gate, x):
        out = fn(norm, gate, x)
        return (out * dy).sum() + 0.1 * jnp.square(out.astype(jnp.float32)).sum(), out

    return nnx.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(norm, gate, x)


def _composed(norm, gate, x):
    return gate(norm(x))


def _cbam_value_and_grads(fn, norm, gate, spatial, x, dy):
    def loss(norm, gate, spatial, x):
        out = fn(norm, gate, spatial, x)
        return (out * dy).sum() + 0.1 * jnp.square(out.astype(jnp.float32)).sum(), out

    return nnx.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True)(norm, gate, spatial, x)


def _cbam_fused(norm, gate, spatial, x):
    return batch_norm_channel_gate(norm, gate, x, spatial)


def _cbam_composed(norm, gate, spatial, x):
    return spatial(gate(norm(x)))


def _assert_same_grads(grads, ref_grads):
    leaves, ref_leaves = jax.tree.leaves_with_path(grads), jax.tree.leaves(ref_grads)
    assert len(leaves) == len(ref_leaves)
    for (path, g), ref in zip(leaves, ref_leaves, strict=True):
        assert_close(g, ref, f"gradient {jax.tree_util.keystr(path)}")


@pytest.mark.parametrize("bias", [True, False])
def test_equals_batch_norm_then_se(bias: bool):
    """Output, dx, the gradients of scale, bias and the SE's weights, and the running
    statistics equal those of BatchNorm then SE (float32)."""
    x, dy = _data(0)
    norm, gate = _norm_and_gate(1, bias)
    ref_norm, ref_gate = nnx.clone(norm), nnx.clone(gate)
    (_, out), grads = _value_and_grads(batch_norm_channel_gate, norm, gate, x, dy)
    (_, ref_out), ref_grads = _value_and_grads(_composed, ref_norm, ref_gate, x, dy)
    assert_close(out, ref_out, "output")
    leaves, ref_leaves = jax.tree.leaves_with_path(grads), jax.tree.leaves(ref_grads)
    assert len(leaves) == len(ref_leaves) == (7 if bias else 5)
    for (path, g), ref in zip(leaves, ref_leaves, strict=True):
        assert_close(g, ref, f"gradient {jax.tree_util.keystr(path)}")
    assert_close(norm.mean[...], ref_norm.mean[...], "running mean")
    assert_close(norm.var[...], ref_norm.var[...], "running var")


@pytest.mark.parametrize("pools", [("avg", "max"), ("max",)])
def test_equals_batch_norm_then_cbam_channel_gate(pools):
    """With a max pool (the maximum of y sits where x is largest, or smallest where the
    scale is negative) as with the mean: values, gradients and running statistics."""
    x, dy = _data(8)
    norm, gate = _norm_and_gate(9, pools=pools)
    ref_norm, ref_gate = nnx.clone(norm), nnx.clone(gate)
    (_, out), grads = _value_and_grads(batch_norm_channel_gate, norm, gate, x, dy)
    (_, ref_out), ref_grads = _value_and_grads(_composed, ref_norm, ref_gate, x, dy)
    assert_close(out, ref_out, "output")
    for (path, g), ref in zip(
        jax.tree.leaves_with_path(grads), jax.tree.leaves(ref_grads), strict=True
    ):
        assert_close(g, ref, f"gradient {jax.tree_util.keystr(path)}")
    assert_close(norm.var[...], ref_norm.var[...], "running var")


@pytest.mark.parametrize("variant", ["official", "timm"])
def test_equals_batch_norm_then_cbam(variant: str):
    """With CBAM's spatial gate inside too (its pools over C of the gated tensor recomputed
    from x): the values, the gradients of x, both gates and the norm, and the running
    statistics of both BatchNorms equal the composition's."""
    x, dy = _data(10)
    norm, gate = _norm_and_gate(11, pools=("avg", "max"))
    spatial = _spatial_gate(12, variant)
    ref = nnx.clone((norm, gate, spatial))
    (_, out), grads = _cbam_value_and_grads(_cbam_fused, norm, gate, spatial, x, dy)
    (_, ref_out), ref_grads = _cbam_value_and_grads(_cbam_composed, *ref, x, dy)
    assert_close(out, ref_out, "output")
    _assert_same_grads(grads, ref_grads)
    for module, ref_module in zip((norm, spatial.bn), (ref[0], ref[2].bn), strict=True):
        assert_close(module.mean[...], ref_module.mean[...], "running mean")
        assert_close(module.var[...], ref_module.var[...], "running var")


def test_spatial_max_gradient_is_shared_between_tied_channels():
    """Two identical channels hold the maximum over C at every pixel: its gradient is split
    between them, as jnp.max splits it (the composition's)."""
    x, dy = _data(13)
    x = x.at[..., 1].set(x[..., 0])
    norm, gate = _norm_and_gate(14, pools=("avg",))
    norm.scale[...] = norm.scale[...].at[1].set(norm.scale[0])
    # y's channels 0 and 1 near 3, the others within 0.5 of 0; g near 1 on 0 and 1
    norm.bias[...] = norm.bias[...].at[:2].set(3.0).at[2:].multiply(0.1)
    norm.scale[...] = norm.scale[...].at[2:].multiply(0.1)
    gate.fc2.kernel[...] = gate.fc2.kernel[...].at[:, 1].set(gate.fc2.kernel[:, 0])
    gate.fc2.bias[...] = gate.fc2.bias[...].at[:2].set(10.0)
    spatial = _spatial_gate(15)
    ref = nnx.clone((norm, gate, spatial))
    (_, out), grads = _cbam_value_and_grads(_cbam_fused, norm, gate, spatial, x, dy)
    (_, ref_out), ref_grads = _cbam_value_and_grads(_cbam_composed, *ref, x, dy)
    assert_close(out, ref_out, "output")
    assert bool((out[..., 0] == out[..., 1]).all()) and bool(
        (out[..., 0] > out[..., 2:].max(-1)).all()
    )
    _assert_same_grads(grads, ref_grads)


def test_other_pools_are_refused():
    norm, gate = _norm_and_gate(0, pools=("avg", "lse"))
    with pytest.raises(ValueError, match="lse"):
        batch_norm_channel_gate(norm, gate, _data(0)[0])


def test_inputs_other_than_nhwc_with_the_norms_channels_are_refused():
    norm, gate = _norm_and_gate(0)
    x = _data(0)[0]
    with pytest.raises(ValueError, match="rank-4 NHWC"):
        batch_norm_channel_gate(norm, gate, x[0])
    with pytest.raises(ValueError, match="NCHW"):
        batch_norm_channel_gate(norm, gate, jnp.zeros((2, C, 5, 5)))


def test_bfloat16_close_to_float32():
    """In bf16 the output keeps the dtype and stays within bf16 rounding of the float32 one."""
    x, dy = _data(2)
    norm, gate = _norm_and_gate(3)
    norm16, gate16 = nnx.clone(norm), nnx.clone(gate)
    norm16.dtype = gate16.dtype = jnp.bfloat16
    (_, out), (_, _, dx) = _value_and_grads(
        batch_norm_channel_gate, norm16, gate16, x.astype(jnp.bfloat16), dy
    )
    (_, ref), (_, _, ref_dx) = _value_and_grads(_composed, norm, gate, x, dy)
    assert out.dtype == dx.dtype == jnp.bfloat16
    assert_close(out, ref, "output", tol=1e-2)
    assert_close(dx, ref_dx, "dx", tol=3e-2)


@pytest.mark.parametrize("spatial", [False, True])
def test_pmap_replicas_equal_one_global_batch(spatial: bool):
    """With the norms' axis_name, statistics and dx are the whole batch's; the parameters'
    gradients are per-replica sums that add up to the global ones (with CBAM's spatial gate
    inside too, its BatchNorm's statistics are the global ones)."""
    n_dev = 4
    x, dy = _data(4, shape=(8, 3, 5, C))
    norm, gate = _norm_and_gate(5, axis_name="r", pools=("avg", "max") if spatial else None)
    ref_norm, ref_gate = _norm_and_gate(5, pools=("avg", "max") if spatial else None)
    gates = (gate, _spatial_gate(6, axis_name="r") if spatial else None)
    ref_gates = (ref_gate, _spatial_gate(6) if spatial else None)
    split = lambda a: a.reshape(n_dev, -1, *a.shape[1:])  # noqa: E731
    graphdef, state = nnx.split((norm, gates))

    def fused(norm, gates, x):
        return batch_norm_channel_gate(norm, gates[0], x, gates[1])

    def composed(norm, gates, x):
        y = gates[0](norm(x))
        return y if gates[1] is None else gates[1](y)

    def replica(state, x, dy):
        norm, gates = nnx.merge(graphdef, state)
        (_, out), grads = _value_and_grads(fused, norm, gates, x, dy)
        return out, grads, nnx.state((norm, gates), nnx.BatchStat)

    out, grads, stats = jax.pmap(replica, axis_name="r", in_axes=(None, 0, 0))(
        state, split(x), split(dy)
    )
    (_, ref_out), ref_grads = _value_and_grads(composed, ref_norm, ref_gates, x, dy)
    assert_close(out.reshape(x.shape), ref_out, "output")
    *param_grads, dx = jax.tree.leaves(grads)
    *ref_param_grads, ref_dx = jax.tree.leaves(ref_grads)
    assert len(param_grads) == len(ref_param_grads) == (9 if spatial else 6)
    assert_close(dx.reshape(x.shape), ref_dx, "dx")
    for g, ref in zip(param_grads, ref_param_grads, strict=True):
        assert_close(g.sum(0), ref, "parameter gradient")
    ref_stats = jax.tree.leaves(nnx.state((ref_norm, ref_gates), nnx.BatchStat))
    assert len(ref_stats) == (4 if spatial else 2)
    for stat, ref in zip(jax.tree.leaves(stats), ref_stats, strict=True):
        assert_close(stat[0], ref, "running statistic")


@pytest.mark.parametrize(
    "block_type, attention",
    [(Bottleneck, "se"), (BasicBlock, "se"), (Bottleneck, "cbam"), (BasicBlock, "cbam_timm")],
)
def test_block_fuses_its_channel_gate_with_its_last_batch_norm_in_training_only(
    block_type, attention, monkeypatch
):
    """With impl="auto" a block's SE, or CBAM's two gates, run through batch_norm_channel_gate
    in training mode, with the values and gradients of impl="xla", which composes the
    modules; not in eval mode."""
    calls = []

    def counted(*args):
        calls.append(args)
        return batch_norm_channel_gate(*args)

    monkeypatch.setattr(blocks, "batch_norm_channel_gate", counted)
    x, _ = _data(6, shape=(3, 6, 6, 8))
    fused = block_type(8, 16, 2, attention=attention, rngs=nnx.Rngs(0), impl="auto")
    plain = block_type(8, 16, 2, attention=attention, rngs=nnx.Rngs(0), impl="xla")
    shape = (3, 3, 3, 16 * block_type.expansion)
    dy = jnp.asarray(np.random.default_rng(7).standard_normal(shape), jnp.float32)
    values = [_value_and_grads(lambda b, _, x: b(x), b, None, x, dy) for b in (fused, plain)]
    (_, out), (g_block, _, g_x) = values[0]
    (_, ref_out), (ref_block, _, ref_x) = values[1]
    assert len(calls) == 1
    assert (calls[0][3] is not None) == attention.startswith("cbam")  # the spatial gate inside
    assert_close(out, ref_out, "output")
    assert_close(g_x, ref_x, "dx")
    for g, ref in zip(jax.tree.leaves(g_block), jax.tree.leaves(ref_block), strict=True):
        assert_close(g, ref, "parameter gradient")
    fused.eval()
    plain.eval()
    assert_close(fused(x), plain(x), "eval output")  # running statistics updated alike
    assert len(calls) == 1
