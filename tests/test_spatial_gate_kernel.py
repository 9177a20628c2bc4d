"""CBAM's fused spatial gate (kernels.spatial_gate, Pallas interpreter on CPU) computes what
its jnp reference and the library path (formulation "conv") compute: values, batch statistics,
running statistics and gradients; across replicas too; and its kernels lower through Triton for
CUDA on this host."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from flax_attention.kernels import PALLAS_KERNELS
from flax_attention.kernels.spatial_gate import spatial_gate, spatial_gate_reference
from flax_attention.layers.cbam import SpatialGate

TOL = 2e-5  # float32: the kernel sums the taps and the statistics in another order


def _inputs(n, h, w, size, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    pooled = jax.random.normal(keys[0], (n, h, w, 2))
    kernel = 0.2 * jax.random.normal(keys[1], (size, size, 2, 1))
    d_gate = jax.random.normal(keys[2], (n, h, w))
    return pooled, kernel, jnp.array([1.3]), jnp.array([0.2]), d_gate


def _value_and_grads(gate_fn, pooled, kernel, scale, bias, d_gate):
    """(gate, mean, var) and the gradients w.r.t. (pooled, kernel, scale, bias) of a loss that
    reaches the gate and both statistics."""

    def loss(*args):
        gate, mean, var = gate_fn(*args)
        return jnp.sum(gate * d_gate) + 0.3 * mean.sum() - 0.7 * var.sum(), (gate, mean, var)

    grads, outs = jax.grad(loss, argnums=(0, 1, 2, 3), has_aux=True)(pooled, kernel, scale, bias)
    return outs, grads


def _assert_close(got, want, tol=TOL):
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert g.shape == w.shape
        assert np.isfinite(np.asarray(g)).all()
        np.testing.assert_allclose(g, w, atol=tol * (1 + float(jnp.abs(w).max())), rtol=0)


def test_kernel_matches_its_reference():
    """k = 7 taps reaching past a 5 x 6 map on every side; 16-pixel programs, so programs split
    samples and the last one is partial."""
    args = _inputs(2, 5, 6, 7)
    fused = jax.jit(lambda *a: spatial_gate(*a, block=16))
    got = _value_and_grads(fused, *args)
    _assert_close(got, _value_and_grads(spatial_gate_reference, *args))


def test_statistics_keep_their_precision_far_from_zero():
    """y = 1000 + noise of std 0.01: the variance (1e-4) from per-program centred sums combined
    pairwise, as float64 gives it (E[y^2] - E[y]^2 in float32 would be off by ~0.06)."""
    noise = 0.01 * jax.random.normal(jax.random.key(1), (4, 8, 8))
    pooled = jnp.stack([1000.0 + noise, noise], axis=-1)
    kernel = jnp.array([1.0, 0.0]).reshape(1, 1, 2, 1)
    _, mean, var = spatial_gate(pooled, kernel, jnp.ones(1), jnp.zeros(1), block=64)
    y = np.asarray(pooled[..., 0], np.float64)
    np.testing.assert_allclose(mean[0], y.mean(), rtol=1e-7)
    np.testing.assert_allclose(var[0], y.var(), rtol=1e-3)


def _gate_state_and_grads(gate: nnx.Module, x: jax.Array, dy: jax.Array):
    """gate(x), its running statistics after the call, and the gradients w.r.t. its parameters
    and x."""

    def loss(module, x):
        y = module(x)
        return jnp.sum(y * dy), y

    grads, y = nnx.jit(nnx.grad(loss, argnums=(0, 1), has_aux=True))(gate, x)
    return y, nnx.state(gate, nnx.BatchStat), grads


@pytest.mark.parametrize("training", [True, False])
def test_spatial_gate_fused_equals_conv(training):
    """SpatialGate with formulation "fused" against "conv": output, running statistics after the
    step and gradients in training; eval mode runs the library conv."""
    x = jax.random.normal(jax.random.key(2), (3, 7, 7, 4))
    dy = jax.random.normal(jax.random.key(3), x.shape)
    results = []
    for form in ("fused", "conv"):
        gate = SpatialGate(7, formulation=form, rngs=nnx.Rngs(0))
        gate.bn.scale[...] = jnp.array([0.8])  # the official init's 0 would hide the normalisation
        gate.train() if training else gate.eval()
        results.append(_gate_state_and_grads(gate, x, dy))
    _assert_close(results[0], results[1])


def test_axis_name_matches_the_whole_batch_on_one_device():
    """Under shard_map over 8 devices, the statistics and gradients with `axis_name` (kernel,
    scale and bias gradients summed over replicas) are those of the whole batch."""
    pooled, kernel, scale, bias, d_gate = _inputs(8, 5, 5, 3, seed=4)
    mesh = Mesh(np.array(jax.devices()[:8]), ("batch",))

    def per_replica(pooled, kernel, scale, bias, d_gate):
        fn = lambda *a: spatial_gate(*a, axis_name="batch", block=16)  # noqa: E731
        (gate, mean, var), grads = _value_and_grads(fn, pooled, kernel, scale, bias, d_gate)
        return gate, mean, var, grads[0], jax.lax.psum(grads[1:], "batch")

    sharded = jax.jit(
        jax.shard_map(
            per_replica,
            mesh=mesh,
            in_specs=(P("batch"), P(), P(), P(), P("batch")),
            out_specs=(P("batch"), P(), P(), P("batch"), P()),
            check_vma=False,
        )
    )
    gate, mean, var, d_pooled, d_params = sharded(pooled, kernel, scale, bias, d_gate)
    (want_gate, want_mean, want_var), want_grads = _value_and_grads(
        spatial_gate_reference, pooled, kernel, scale, bias, d_gate
    )
    _assert_close(
        (gate, mean, var, d_pooled, *d_params), (want_gate, want_mean, want_var, *want_grads)
    )


def test_the_kernels_lower_through_triton_for_cuda():
    """Every "cuda" entry of PALLAS_KERNELS lowers for CUDA on this host: Pallas' Triton lowering
    (power-of-two shapes, supported primitives) runs without a GPU; the 4 launches of the
    spatial gate are Triton custom calls."""
    launches = {}
    for entry in (k for k in PALLAS_KERNELS if k.platform == "cuda"):
        lowered = jax.jit(entry.fn).trace(*entry.example_args()).lower(lowering_platforms=("cuda",))
        launches[entry.fn.__name__] = lowered.as_text().count("xla.gpu.triton")
    assert launches["forward_and_backward"] == 4
    assert all(launches.values())
