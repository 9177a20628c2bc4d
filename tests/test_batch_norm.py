"""BatchNorm's fused custom VJP against PyTorch, plain autodiff, and across pmap replicas."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from parity import assert_close, nchw, nhwc

from flax_attention.layers import BatchNorm
from flax_attention.layers.batch_norm import batch_norm_train
from flax_attention.training.collectives import count_collectives

C = 6


def _inputs(seed: int, shape=(4, 5, 3, C), offset: float = 0.0):
    """Random NHWC data with per-channel offsets (a mean far from 0 tests the variance)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32) * rng.uniform(0.5, 2.0, C).astype(np.float32)
    x += offset * rng.standard_normal(C).astype(np.float32)
    return x, rng.standard_normal(shape).astype(np.float32)


def _plain(x, scale, bias, eps=1e-5):
    """The same forward by plain autodiff: the reference for the custom VJP."""
    mean = x.mean((0, 1, 2))
    var = jnp.square(x - mean).mean((0, 1, 2))
    y = (x - mean) * jax.lax.rsqrt(var + eps) * scale + bias
    return y, mean, var


@pytest.mark.parametrize("offset", [0.0, 30.0])
def test_train_mode_matches_pytorch(offset: float):
    x, dy = _inputs(0, offset=offset)
    ref = torch.nn.BatchNorm2d(C, momentum=0.1)
    with torch.no_grad():
        ref.weight.copy_(torch.rand(C) + 0.5)
        ref.bias.copy_(torch.randn(C))
        ref.running_mean.copy_(torch.randn(C))
        ref.running_var.copy_(torch.rand(C) + 0.5)
    bn = BatchNorm(C, rngs=nnx.Rngs(0))
    bn.scale[...] = jnp.asarray(ref.weight.detach().numpy())
    bn.bias[...] = jnp.asarray(ref.bias.detach().numpy())
    bn.mean[...] = jnp.asarray(ref.running_mean.numpy())
    bn.var[...] = jnp.asarray(ref.running_var.numpy())

    xt = nchw(x).requires_grad_(True)
    yt = ref.train()(xt)
    (yt * nchw(dy)).sum().backward()

    def loss(bn, x):
        y = bn(x)
        return (y * dy).sum(), y

    (_, y), (g_bn, g_x) = nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True)(bn, x)
    assert_close(y, nhwc(yt), "output")
    assert_close(g_x, nhwc(xt.grad), "dx")
    assert_close(g_bn.scale[...], ref.weight.grad.numpy(), "dscale")
    assert_close(g_bn.bias[...], ref.bias.grad.numpy(), "dbias")
    assert_close(bn.mean[...], ref.running_mean.numpy(), "running mean")
    assert_close(bn.var[...], ref.running_var.numpy(), "running var")


def test_one_pass_statistics_keep_precision_far_from_zero():
    """The one-pass statistics against float64 where E[x^2] - E[x]^2 in float32 loses every
    digit of the variance (a mean 20,000 standard deviations from zero)."""
    rng = np.random.default_rng(7)
    x = (1e3 + 0.05 * rng.standard_normal((8, 6, 5, C))).astype(np.float32)
    ones, zeros = jnp.ones(C), jnp.zeros(C)
    _, mean, var = jax.jit(batch_norm_train, static_argnums=(3, 4, 5))(
        x, ones, zeros, 1e-5, None, jnp.float32
    )
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(mean, x64.mean((0, 1, 2)), rtol=1e-7)
    np.testing.assert_allclose(var, x64.var((0, 1, 2)), rtol=1e-4)


def test_custom_vjp_equals_autodiff_including_statistics():
    """Cotangents reaching the batch mean and variance flow back into x like autodiff's."""
    x, dy = _inputs(1, offset=3.0)
    rng = np.random.default_rng(2)
    scale, bias, u, v = (jnp.asarray(rng.standard_normal(C), jnp.float32) for _ in range(4))

    def objective(fn):
        def f(x, scale, bias):
            y, mean, var = fn(x, scale, bias)
            return (y * dy).sum() + (mean * u).sum() + (var * v).sum()

        return jax.grad(f, argnums=(0, 1, 2))

    fused = objective(lambda x, s, b: batch_norm_train(x, s, b, 1e-5, None, jnp.float32))
    for got, want, what in zip(
        fused(x, scale, bias), objective(_plain)(x, scale, bias), "xsb", strict=True
    ):
        assert_close(got, want, f"d{what}")


def test_pmap_replicas_equal_one_global_batch():
    """With axis_name, statistics and dx are those of the whole batch; dscale/dbias are local
    sums that add up to the global ones."""
    n_dev = 4
    x, dy = _inputs(3, shape=(8, 4, 4, C), offset=2.0)
    rng = np.random.default_rng(4)
    scale, bias = (jnp.asarray(rng.standard_normal(C), jnp.float32) for _ in range(2))

    def grads(axis_name):
        def f(x, dy, scale, bias):
            y, mean, var = batch_norm_train(x, scale, bias, 1e-5, axis_name, jnp.float32)
            return (y * dy).sum(), (mean, var)

        return jax.grad(f, argnums=(0, 2, 3), has_aux=True)

    (gx, gs, gb), (mean, var) = grads(None)(x, dy, scale, bias)
    split = lambda a: a.reshape(n_dev, -1, *a.shape[1:])  # noqa: E731
    pm = jax.pmap(grads("r"), axis_name="r", in_axes=(0, 0, None, None))
    (px, ps, pb), (pmean, pvar) = pm(split(x), split(dy), scale, bias)
    assert_close(px.reshape(x.shape), gx, "dx")
    assert_close(ps.sum(0), gs, "dscale")
    assert_close(pb.sum(0), gb, "dbias")
    assert_close(pmean[0], mean, "mean")
    assert_close(pvar[0], var, "var")


def test_cross_replica_statistics_in_one_collective_each_way():
    """On 8 replicas whose batch means differ widely, statistics, dx and the running-statistics
    inputs equal the single-device ones; the compiled step has one all-gather (forward) and one
    all-reduce (backward), where per-statistic all-reduces would give three."""
    n_dev = 8
    x, dy = _inputs(6, shape=(16, 3, 3, C))
    x = x + 50.0 * np.repeat(np.arange(n_dev, dtype=np.float32), 2)[:, None, None, None]
    rng = np.random.default_rng(7)
    scale, bias = (jnp.asarray(rng.standard_normal(C), jnp.float32) for _ in range(2))

    def grads(axis_name):
        def f(x, dy, scale, bias):
            y, mean, var = batch_norm_train(x, scale, bias, 1e-5, axis_name, jnp.float32)
            return (y * dy).sum() + (mean * var).sum(), (mean, var)

        return jax.grad(f, argnums=(0, 2, 3), has_aux=True)

    (gx, gs, gb), (mean, var) = grads(None)(x, dy, scale, bias)
    split = lambda a: a.reshape(n_dev, -1, *a.shape[1:])  # noqa: E731
    pm = jax.pmap(grads("r"), axis_name="r", in_axes=(0, 0, None, None))
    (px, ps, pb), (pmean, pvar) = pm(split(x), split(dy), scale, bias)
    assert_close(pmean[0], mean, "mean")
    assert_close(pvar[0], var, "var")
    assert_close(px.reshape(x.shape), gx, "dx")
    assert_close(ps.sum(0), gs, "dscale")
    assert_close(pb.sum(0), gb, "dbias")
    hlo = pm.lower(split(x), split(dy), scale, bias).compile().as_text()
    counts = count_collectives(hlo)
    assert (counts.get("all-gather"), counts.get("all-reduce"), counts["total"]) == (1, 1, 2)


def test_bf16_activations_keep_their_dtype():
    x, dy = _inputs(5)
    xb, dyb = jnp.asarray(x, jnp.bfloat16), jnp.asarray(dy, jnp.bfloat16)
    ones, zeros = jnp.ones(C), jnp.zeros(C)
    fused = lambda x: batch_norm_train(x, ones, zeros, 1e-5, None, jnp.bfloat16)[0]  # noqa: E731
    y, vjp = jax.vjp(fused, xb)
    (dx,) = vjp(dyb)
    assert y.dtype == dx.dtype == jnp.bfloat16
    want_y, want_vjp = jax.vjp(lambda x: _plain(x, 1.0, 0.0)[0], xb.astype(jnp.float32))
    assert_close(y, want_y, "bf16 output", tol=1e-2)
    assert_close(dx, want_vjp(dyb.astype(jnp.float32))[0], "bf16 dx", tol=1e-2)
