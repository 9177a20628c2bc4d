"""BatchNorm + a channel gate (SE, CBAM's) as one custom VJP (layers.norm_gate) against the
modules composed: alone, across pmap replicas and inside residual blocks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from parity import assert_close

from flax_attention.architectures import blocks
from flax_attention.architectures.blocks import BasicBlock, Bottleneck
from flax_attention.layers import SE, BatchNorm, ChannelGate
from flax_attention.layers.norm_gate import batch_norm_channel_gate

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


def test_pmap_replicas_equal_one_global_batch():
    """With the norm's axis_name, statistics and dx are the whole batch's; the parameters'
    gradients are per-replica sums that add up to the global ones."""
    n_dev = 4
    x, dy = _data(4, shape=(8, 3, 5, C))
    norm, gate = _norm_and_gate(5, axis_name="r")
    ref_norm, ref_gate = _norm_and_gate(5)
    split = lambda a: a.reshape(n_dev, -1, *a.shape[1:])  # noqa: E731
    graphdef, state = nnx.split((norm, gate))

    def replica(state, x, dy):
        norm, gate = nnx.merge(graphdef, state)
        (_, out), grads = _value_and_grads(batch_norm_channel_gate, norm, gate, x, dy)
        return out, grads, nnx.state(norm, nnx.BatchStat)

    out, grads, stats = jax.pmap(replica, axis_name="r", in_axes=(None, 0, 0))(
        state, split(x), split(dy)
    )
    (_, ref_out), ref_grads = _value_and_grads(_composed, ref_norm, ref_gate, x, dy)
    assert_close(out.reshape(x.shape), ref_out, "output")
    *param_grads, dx = jax.tree.leaves(grads)
    *ref_param_grads, ref_dx = jax.tree.leaves(ref_grads)
    assert_close(dx.reshape(x.shape), ref_dx, "dx")
    for g, ref in zip(param_grads, ref_param_grads, strict=True):
        assert_close(g.sum(0), ref, "parameter gradient")
    assert_close(stats["mean"][...][0], ref_norm.mean[...], "running mean")
    assert_close(stats["var"][...][0], ref_norm.var[...], "running var")


def _se_factory(channels, *, rngs, dtype, param_dtype):
    """An SE built by a user's factory rather than a preset."""
    return SE(channels, 4, rngs=rngs, dtype=dtype, param_dtype=param_dtype)


def _composed_norm_and_attention(norm, attention, z):
    """`blocks._normalize_and_attend` unfused: the modules composed."""
    return norm(z) if attention is None else attention(norm(z))


@pytest.mark.parametrize(
    "block_type, attention",
    [
        (Bottleneck, "se"),
        (BasicBlock, "se"),
        (Bottleneck, "cbam"),
        (BasicBlock, "cbam_timm"),
        (BasicBlock, _se_factory),
    ],
)
def test_block_fuses_its_channel_gate_with_its_last_batch_norm_in_training_only(
    block_type, attention, monkeypatch
):
    """A block's SE, or CBAM's channel gate (its spatial gate after it), preset or built by a
    factory, runs through batch_norm_channel_gate in training mode, with the values and
    gradients of the modules composed; not in eval mode."""
    calls = []

    def counted(*args):
        calls.append(args)
        return batch_norm_channel_gate(*args)

    monkeypatch.setattr(blocks, "batch_norm_channel_gate", counted)
    x, _ = _data(6, shape=(3, 6, 6, 8))
    fused = block_type(8, 16, 2, attention=attention, rngs=nnx.Rngs(0))
    plain = block_type(8, 16, 2, attention=attention, rngs=nnx.Rngs(0))
    shape = (3, 3, 3, 16 * block_type.expansion)
    dy = jnp.asarray(np.random.default_rng(7).standard_normal(shape), jnp.float32)
    (_, out), (g_block, _, g_x) = _value_and_grads(lambda b, _, x: b(x), fused, None, x, dy)
    assert len(calls) == 1
    with monkeypatch.context() as unfused:
        unfused.setattr(blocks, "_normalize_and_attend", _composed_norm_and_attention)
        (_, ref_out), (ref_block, _, ref_x) = _value_and_grads(
            lambda b, _, x: b(x), plain, None, x, dy
        )
    assert len(calls) == 1
    assert_close(out, ref_out, "output")
    assert_close(g_x, ref_x, "dx")
    for g, ref in zip(jax.tree.leaves(g_block), jax.tree.leaves(ref_block), strict=True):
        assert_close(g, ref, "parameter gradient")
    fused.eval()
    plain.eval()
    assert_close(fused(x), plain(x), "eval output")  # running statistics updated alike
    assert len(calls) == 1
