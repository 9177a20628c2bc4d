"""CBAM's spatial gate after its pools, as Pallas kernels: the k x k conv (2 -> 1 channel, no
bias), the one-channel training-mode BatchNorm and the sigmoid.

From `pooled` (N, H, W, 2) float32 (the two maps over C), an HWIO `kernel` (k, k, 2, 1), odd k,
'same' zero padding, and the BatchNorm's `scale` and `bias` (1,):

    y = conv(pooled)                                        (N, H, W)
    gate = sigmoid((y - mean) * rsqrt(var + eps) * scale + bias)

with `mean` and the biased `var` the statistics of y over the batch (over every replica of
`axis_name` when given), all in float32; `spatial_gate` returns (gate, mean (1,), var (1,)).

Each program of a launch owns `block` consecutive output pixels of the flattened (N*H*W) map;
a tap (i, j) of pixel g is pixel `g + (i - p) * W + (j - p)` of the same sample, a gathered load
masked where it leaves the sample's H x W (p = k // 2). Indices past the end are clamped, so a
lane beyond N*H*W recomputes and stores the last pixel's value (an identical duplicate store)
and is left out of every sum.
- forward, 2 launches: (1) the conv, y, and per program its pixel count, mean and sum of squared
  deviations from that mean; (2) every program combines all programs' partials (Chan et al.'s
  pairwise formula: no E[y^2] - E[y]^2 cancellation), normalises its pixels and applies the
  sigmoid. With `axis_name` the replicas' combined partials are all_gathered and combined
  between the two launches.
- backward, 2 launches: (A) per program, with z = BatchNorm's output and dz = d_gate * g(1 - g),
  the sums of dz and dz * xhat; (B) every program adds up those partials (psum'd over
  `axis_name` between the launches), forms dy = d(pre-BatchNorm) as BatchNorm's backward does,
  and writes d_pooled, the transposed conv of dy (the flipped kernel; dy at each tap's pixel is
  recomputed from y and d_gate), and its partial sums of dy * tap for the kernel's k*k*2
  gradient, added up over programs by one jnp sum.

Triton lowers the kernels on GPU (`compiler_params` names it); on any other backend they run in
the Pallas interpreter. `spatial_gate_reference` is the same function in plain jnp.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

F32 = jnp.float32
BLOCK = 1024  # output pixels per program
NUM_WARPS = 4


@dataclass(frozen=True)
class _Config:
    """The static arguments of one call: BatchNorm's eps, the replicas' axis, the launch shape."""

    eps: float
    axis_name: str | None
    block: int
    num_warps: int
    interpret: bool


def spatial_gate_reference(
    pooled: jax.Array, kernel: jax.Array, scale: jax.Array, bias: jax.Array, eps: float = 1e-5
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`spatial_gate` in plain jnp (one device): (gate (N, H, W), mean (1,), var (1,)) float32."""
    y = lax.conv_general_dilated(
        pooled.astype(F32),
        kernel.astype(F32),
        (1, 1),
        "SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=lax.Precision.HIGHEST,
    )[..., 0]
    mean = y.mean()
    var = jnp.square(y - mean).mean()
    z = (y - mean) * lax.rsqrt(var + eps) * scale.astype(F32)[0] + bias.astype(F32)[0]
    return jax.nn.sigmoid(z), mean[None], var[None]


def spatial_gate(
    pooled: jax.Array,
    kernel: jax.Array,
    scale: jax.Array,
    bias: jax.Array,
    eps: float = 1e-5,
    axis_name: str | None = None,
    *,
    block: int = BLOCK,
    num_warps: int = NUM_WARPS,
    interpret: bool | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The gate (N, H, W) float32 and the batch mean and biased variance of the conv output, each
    (1,) float32, from `pooled` (N, H, W, 2) float32, HWIO `kernel` (k, k, 2, 1) with k odd and
    BatchNorm's `scale`, `bias` (1,). Statistics cover every replica of `axis_name` when given.

    Differentiable in pooled, kernel, scale and bias (and through mean and var). `block` (a power
    of two) is the output pixels per program; `interpret` defaults to True off GPU.
    """
    c = pooled.shape[-1]
    size = kernel.shape[0]
    if pooled.ndim != 4 or c != 2 or kernel.shape != (size, size, 2, 1) or size % 2 == 0:
        raise ValueError(
            f"spatial_gate needs pooled (N, H, W, 2) and an odd (k, k, 2, 1) kernel; got "
            f"{pooled.shape} and {kernel.shape}"
        )
    if block < 1 or block & (block - 1):
        raise ValueError(f"block must be a power of two, got {block}")
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    config = _Config(float(eps), axis_name, block, num_warps, interpret)
    args = (pooled.astype(F32), kernel.astype(F32), scale.astype(F32), bias.astype(F32))
    return _spatial_gate(config, *args)


def forward_and_backward(
    pooled: jax.Array,
    kernel: jax.Array,
    scale: jax.Array,
    bias: jax.Array,
    d_gate: jax.Array,
    *,
    interpret: bool = False,
    block: int = BLOCK,
) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    """All four launches: the gate (N, H, W) and the gradients of sum(gate * d_gate) with
    respect to (pooled, kernel, scale, bias). Lowers through Triton unless `interpret` (the
    GPU lowering test and benchmarks.lab.spatial_gate_check call it)."""

    def gate_of(*args):
        return spatial_gate(*args, interpret=interpret, block=block)[0]

    gate, vjp = jax.vjp(gate_of, pooled, kernel, scale, bias)
    return gate, vjp(d_gate)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _spatial_gate(config: _Config, pooled, kernel, scale, bias):
    return _forward(config, pooled, kernel, scale, bias)[0]


# ----------------------------------------------------------------------------- kernel helpers


def _compiler_params(num_warps: int) -> Any:
    """Triton's compiler parameters (which also select the Triton lowering on GPU); None where
    this jax has no Pallas Triton backend."""
    try:
        from jax.experimental.pallas import triton as pltriton
    except ImportError:  # pragma: no cover - jax without the Triton backend
        return None
    return pltriton.CompilerParams(num_warps=num_warps)


def _call(kernel, config: _Config, grid: int, out_shape, name: str):
    return pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(grid,),
        interpret=config.interpret,
        compiler_params=None if config.interpret else _compiler_params(config.num_warps),
        name=name,
    )


def _lanes(total: int, block: int) -> tuple[jax.Array, jax.Array]:
    """This program's flat pixel indices (block,), clamped to the last pixel, and which are real."""
    g = pl.program_id(0) * block + jnp.arange(block, dtype=jnp.int32)
    return jnp.minimum(g, total - 1), g < total


def _tap(g, row, col, di, dj, h: int, w: int, total: int) -> tuple[jax.Array, jax.Array]:
    """The flat index of pixel (row + di, col + dj) of pixel g's sample, clamped into range, and
    whether it lies inside the sample's H x W."""
    r, c = row + di, col + dj
    inside = (r >= 0) & (r < h) & (c >= 0) & (c < w)
    return jnp.clip(g + di * w + dj, 0, total - 1), inside


def _masked_sum(x: jax.Array, mask: jax.Array) -> jax.Array:
    return jnp.sum(jnp.where(mask, x, 0.0))


def _chan(counts, means, m2s, shift) -> tuple[Any, Any, Any]:
    """Pairwise (Chan et al.) combination of groups' (count, mean, sum of squared deviations):
    the whole's count, mean and sum of squared deviations. The means are averaged relative to
    `shift` (one of them), so that their common offset does not round the result. Plain jnp:
    used inside the kernels and between replicas."""
    total = jnp.sum(counts)
    mean = shift + jnp.sum(counts * (means - shift)) / total
    return total, mean, jnp.sum(m2s) + jnp.sum(counts * jnp.square(means - mean))


def _mean(x: jax.Array, mask: jax.Array, count: jax.Array) -> jax.Array:
    """The mean of x where mask, corrected by the mean of the residuals (a second pass over
    registers: the first sum's rounding at a large offset is removed)."""
    first = _masked_sum(x, mask) / count
    return first + _masked_sum(x - first, mask) / count


def _read_parts(part_ref, row: int, num_parts: int) -> jax.Array:
    """Row `row` of the (rows, num_parts) partials, zero-padded to a power of two."""
    index = jnp.arange(pl.next_power_of_2(num_parts), dtype=jnp.int32)
    values = part_ref[row, jnp.minimum(index, num_parts - 1)]
    return jnp.where(index < num_parts, values, 0.0)


def _gate_of(y, mean, rstd, scale, bias) -> tuple[jax.Array, jax.Array]:
    """BatchNorm's normalised y (xhat) and the gate sigmoid(xhat * scale + bias)."""
    xhat = (y - mean) * rstd
    return xhat, 1.0 / (1.0 + jnp.exp(-(xhat * scale + bias)))


# ----------------------------------------------------------------------------- forward


def _conv_kernel(pooled_ref, kernel_ref, y_ref, part_ref, *, shape, size, block):
    """y for this program's pixels; its partials (count, mean, M2) in column program_id."""
    n, h, w = shape
    total, pad = n * h * w, size // 2
    g, valid = _lanes(total, block)
    pix = lax.rem(g, h * w)
    row, col = lax.div(pix, w), lax.rem(pix, w)

    def kernel_row(i, acc):
        for j in range(size):
            src, inside = _tap(g, row, col, i - pad, j - pad, h, w, total)
            for c in range(2):
                weight = kernel_ref[(i * size + j) * 2 + c]
                acc = acc + jnp.where(inside, pooled_ref[src * 2 + c], 0.0) * weight
        return acc

    y = lax.fori_loop(0, size, kernel_row, jnp.zeros((block,), F32))
    y_ref[g] = y
    count = jnp.sum(valid.astype(F32))
    mean = _mean(y, valid, count)
    program = pl.program_id(0)
    part_ref[0, program] = count
    part_ref[1, program] = mean
    part_ref[2, program] = _masked_sum(jnp.square(y - mean), valid)


def _normalize_kernel(
    y_ref, part_ref, affine_ref, gate_ref, stats_ref, *, total, parts, block, eps
):
    """The gate of this program's pixels from all partials; program 0 also writes (mean, var)."""
    rows = (_read_parts(part_ref, row, parts) for row in range(3))
    count, mean, m2 = _chan(*rows, shift=part_ref[1, 0])
    var = m2 / count
    g, _ = _lanes(total, block)
    _, gate = _gate_of(y_ref[g], mean, lax.rsqrt(var + eps), affine_ref[0], affine_ref[1])
    gate_ref[g] = gate

    @pl.when(pl.program_id(0) == 0)
    def _():
        stats_ref[0] = mean
        stats_ref[1] = var


def _forward(config: _Config, pooled, kernel, scale, bias):
    n, h, w, _ = pooled.shape
    size = kernel.shape[0]
    total, block = n * h * w, config.block
    grid = pl.cdiv(total, block)
    conv = _call(
        functools.partial(_conv_kernel, shape=(n, h, w), size=size, block=block),
        config,
        grid,
        (jax.ShapeDtypeStruct((total,), F32), jax.ShapeDtypeStruct((3, grid), F32)),
        "cbam_spatial_conv",
    )
    y, parts = conv(pooled.reshape(-1), kernel.reshape(-1))
    if config.axis_name is not None:
        parts = _combine_replicas(parts, config.axis_name)
    normalize = _call(
        functools.partial(
            _normalize_kernel, total=total, parts=parts.shape[1], block=block, eps=config.eps
        ),
        config,
        grid,
        (jax.ShapeDtypeStruct((total,), F32), jax.ShapeDtypeStruct((2,), F32)),
        "cbam_spatial_normalize",
    )
    gate, stats = normalize(y, parts, jnp.concatenate([scale, bias]))
    mean, var = stats[:1], stats[1:]
    residuals = (pooled, kernel, scale, bias, y, mean, var)
    return (gate.reshape(n, h, w), mean, var), residuals


def _combine_replicas(parts: jax.Array, axis_name: str) -> jax.Array:
    """This replica's partials (3, P) combined with every replica's: one column (3, 1)."""
    local = jnp.stack(_chan(*parts, shift=parts[1, 0]))
    gathered = lax.all_gather(local, axis_name).T  # (3, R)
    return jnp.stack(_chan(*gathered, shift=gathered[1, 0]))[:, None]


# ----------------------------------------------------------------------------- backward


def _bn_sums_kernel(y_ref, d_gate_ref, coef_ref, part_ref, *, total, block):
    """This program's sums of dz and dz * xhat (dz: the cotangent of BatchNorm's output)."""
    g, valid = _lanes(total, block)
    xhat, gate = _gate_of(y_ref[g], coef_ref[2], coef_ref[3], coef_ref[0], coef_ref[1])
    dz = d_gate_ref[g] * gate * (1.0 - gate)
    program = pl.program_id(0)
    part_ref[0, program] = _masked_sum(dz, valid)
    part_ref[1, program] = _masked_sum(dz * xhat, valid)


def _input_grads_kernel(
    pooled_ref,
    kernel_ref,
    y_ref,
    d_gate_ref,
    part_ref,
    coef_ref,
    d_pooled_ref,
    d_kernel_ref,
    sums_ref,
    *,
    shape,
    size,
    parts,
    block,
):
    """d_pooled for this program's pixels, its partial kernel gradient (row program_id of
    (programs, k*k*2)), and (program 0) the totals (sum dz * xhat, sum dz)."""
    n, h, w = shape
    total, pad = n * h * w, size // 2
    scale, bias, mean, rstd = coef_ref[0], coef_ref[1], coef_ref[2], coef_ref[3]
    d_mean, d_var, count = coef_ref[4], coef_ref[5], coef_ref[6]
    sum_dz = jnp.sum(_read_parts(part_ref, 0, parts))
    sum_dz_xhat = jnp.sum(_read_parts(part_ref, 1, parts))
    # dy = a * dz + b * (y - mean) + c: BatchNorm's backward (layers.batch_norm) with
    # sum(dz * (y - mean)) = sum_dz_xhat / rstd.
    a = scale * rstd
    b = -scale * rstd * rstd * sum_dz_xhat / count + 2.0 * d_var / count
    c = -a * sum_dz / count + d_mean / count

    def d_pre_norm(index):
        y = y_ref[index]
        _, gate = _gate_of(y, mean, rstd, scale, bias)
        return a * (d_gate_ref[index] * gate * (1.0 - gate)) + b * (y - mean) + c

    g, valid = _lanes(total, block)
    pix = lax.rem(g, h * w)
    row, col = lax.div(pix, w), lax.rem(pix, w)
    dy = jnp.where(valid, d_pre_norm(g), 0.0)
    program = pl.program_id(0)

    def kernel_row(i, acc):
        acc = list(acc)
        for j in range(size):
            tap = (i * size + j) * 2
            # kernel gradient: dy here times the pooled value under tap (i, j)
            src, inside = _tap(g, row, col, i - pad, j - pad, h, w, total)
            for ch in range(2):
                d_kernel_ref[program, tap + ch] = _masked_sum(dy * pooled_ref[src * 2 + ch], inside)
            # input gradient: the output pixel that read this pixel through tap (i, j)
            out, reads = _tap(g, row, col, pad - i, pad - j, h, w, total)
            dy_out = jnp.where(reads, d_pre_norm(out), 0.0)
            for ch in range(2):
                acc[ch] = acc[ch] + dy_out * kernel_ref[tap + ch]
        return tuple(acc)

    zeros = jnp.zeros((block,), F32)
    d0, d1 = lax.fori_loop(0, size, kernel_row, (zeros, zeros))
    d_pooled_ref[g * 2] = d0
    d_pooled_ref[g * 2 + 1] = d1

    @pl.when(program == 0)
    def _():
        sums_ref[0] = sum_dz_xhat
        sums_ref[1] = sum_dz


def _backward(config: _Config, residuals, cotangents):
    pooled, kernel, scale, bias, y, mean, var = residuals
    d_gate, d_mean, d_var = cotangents
    n, h, w, _ = pooled.shape
    size = kernel.shape[0]
    total, block = n * h * w, config.block
    grid = pl.cdiv(total, block)
    rstd = lax.rsqrt(var + config.eps)
    count = jnp.asarray(total, F32)
    if config.axis_name is not None:
        count = count * lax.psum(1, config.axis_name)
    coef = jnp.concatenate([scale, bias, mean, rstd, d_mean, d_var, count[None]])
    d_gate = d_gate.astype(F32).reshape(-1)
    sums = _call(
        functools.partial(_bn_sums_kernel, total=total, block=block),
        config,
        grid,
        jax.ShapeDtypeStruct((2, grid), F32),
        "cbam_spatial_bn_sums",
    )
    parts = sums(y, d_gate, coef)
    local_sums = None
    if config.axis_name is not None:  # dy needs every replica's sums; the parameters' own
        local_sums = parts.sum(1)
        parts = lax.psum(local_sums, config.axis_name)[:, None]
    grads = _call(
        functools.partial(
            _input_grads_kernel, shape=(n, h, w), size=size, parts=parts.shape[1], block=block
        ),
        config,
        grid,
        (
            jax.ShapeDtypeStruct((total * 2,), F32),
            jax.ShapeDtypeStruct((grid, size * size * 2), F32),
            jax.ShapeDtypeStruct((2,), F32),
        ),
        "cbam_spatial_input_grads",
    )
    d_pooled, d_kernel_parts, totals = grads(
        pooled.reshape(-1), kernel.reshape(-1), y, d_gate, parts, coef
    )
    if local_sums is not None:
        totals = local_sums[::-1]
    d_kernel = d_kernel_parts.sum(0).reshape(kernel.shape)
    return d_pooled.reshape(pooled.shape), d_kernel, totals[:1], totals[1:]


_spatial_gate.defvjp(_forward, _backward)
