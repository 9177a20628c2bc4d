"""A 1x1 convolution as a GEMM with BatchNorm fused on both sides ("NormConv").

`norm_conv(x, in_scale, in_bias, w)` on rows `x (M, K)` (an NHWC activation flattened over
N, H, W) computes

    h = relu(x * in_scale + in_bias)        (the previous BatchNorm applied on load; optional)
    y = h @ w                               (M, N), written once in x's dtype
    mean, var of y per column               (this BatchNorm's batch statistics, float32)

`y` is rounded to x's dtype before its statistics are taken, as an unfused BatchNorm sees
it. The statistics are exact in the two-pass sense: every (block_m, block_n) output tile
writes its column means and sums of squared deviations from them (`M2`) in its epilogue,
and the tiles are combined with Chan et al.'s pairwise formula, so no E[y^2] - E[y]^2
cancellation occurs.

The GPU kernel is a Pallas (Triton) program per output tile; `norm_conv_reference` is the
same computation in plain jnp. The VJP (the same for both) recomputes `h` from `x` and
differentiates through the statistics: the cotangents of mean and var join dy on load.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

F32 = jnp.float32


@dataclass(frozen=True)
class Blocks:
    """Output tile (`m` rows, `n` columns), K step, and Triton's warps and pipeline stages."""

    m: int = 128
    n: int = 128
    k: int = 64
    warps: int = 4
    stages: int = 3


@dataclass(frozen=True)
class Tiling:
    """The forward kernel's blocks; the backward's (`dgrad`: rows, dx columns, step over N;
    `wgrad`: step over rows, dw columns, dw rows), or None for the backward in XLA."""

    forward: Blocks
    dgrad: Blocks | None = None
    wgrad: Blocks | None = None


_BLOCK_M, _BLOCK_K = 128, 64
# The Pallas backward measured faster than XLA's only with a prologue on many rows (one H100:
# ResNet-50's conv3 at 56x56 and 28x28); narrow and wide K take different tiles.
_PALLAS_BACKWARD_ROWS = 2**17
_NARROW_BACKWARD = (Blocks(128, 64, 64, 4, 3), Blocks(64, 64, 64, 4, 3))
_WIDE_BACKWARD = (Blocks(128, 128, 64, 8, 3), Blocks(64, 128, 128, 8, 3))


def supports(m: int, k: int, n: int) -> bool:
    """Whether `norm_conv` takes x (m, k) @ w (k, n): every size a multiple of its block."""
    return m % _BLOCK_M == 0 and k % _BLOCK_K == 0 and n % 64 == 0


def choose_tiling(m: int, k: int, n: int, prologue: bool) -> Tiling:
    """The tiles measured fastest for x (m, k) @ w (k, n) (`supports` must hold)."""
    forward = Blocks(_BLOCK_M, 128 if n % 128 == 0 else 64, _BLOCK_K, 4, 3)
    if not prologue or m < _PALLAS_BACKWARD_ROWS:
        return Tiling(forward)
    dgrad, wgrad = _NARROW_BACKWARD if k == 64 else _WIDE_BACKWARD
    if not _backward_fits(m, k, n, dgrad, wgrad):
        return Tiling(forward)
    return Tiling(forward, dgrad, wgrad)


def _backward_fits(m: int, k: int, n: int, dgrad: Blocks, wgrad: Blocks) -> bool:
    """Whether the backward kernels' blocks tile x (m, k) @ w (k, n)."""
    dgrad_fits = m % dgrad.m == 0 and k % dgrad.n == 0 and n % dgrad.k == 0
    return dgrad_fits and (m & -m) >= wgrad.m and k % wgrad.k == 0 and n % wgrad.n == 0


def _prologue(x: jax.Array, scale: jax.Array | None, bias: jax.Array | None) -> jax.Array:
    """relu(x * scale + bias) in float32, or x in float32 when there is no prologue."""
    x32 = x.astype(F32)
    if scale is None:
        return x32
    return jnp.maximum(x32 * scale.astype(F32) + bias.astype(F32), 0.0)


def norm_conv_reference(
    x: jax.Array, in_scale: jax.Array | None, in_bias: jax.Array | None, w: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`norm_conv` in plain jnp: (y (M, N) in x.dtype, mean (N,), biased var (N,))."""
    h = _prologue(x, in_scale, in_bias).astype(x.dtype)
    y = jnp.dot(h, w.astype(x.dtype), preferred_element_type=F32).astype(x.dtype)
    y32 = y.astype(F32)
    mean = y32.mean(0)
    return y, mean, jnp.square(y32 - mean).mean(0)


def _kernel(x_ref, scale_ref, bias_ref, w_ref, y_ref, mean_ref, m2_ref, *, blocks, prologue):
    """One (blocks.m, blocks.n) tile of y, and its column means and M2."""
    k_total = x_ref.shape[1]

    def step(i, acc):
        ks = pl.ds(i * blocks.k, blocks.k)
        x = x_ref[:, ks]
        if prologue:
            x = _prologue(x, scale_ref[ks], bias_ref[ks]).astype(x_ref.dtype)
        return acc + jnp.dot(x, w_ref[ks, :], preferred_element_type=F32)

    acc = jax.lax.fori_loop(0, k_total // blocks.k, step, jnp.zeros((blocks.m, blocks.n), F32))
    y = acc.astype(y_ref.dtype)
    y_ref[...] = y
    y32 = y.astype(F32)
    mean = jnp.sum(y32, axis=0) / blocks.m
    mean_ref[...] = mean[None]
    m2_ref[...] = jnp.sum(jnp.square(y32 - mean[None]), axis=0)[None]


def _check(x: jax.Array, w: jax.Array, blocks: Blocks) -> None:
    (m, k), (k2, n) = x.shape, w.shape
    if k != k2:
        raise ValueError(f"norm_conv: x has {k} columns but w has {k2} rows")
    for name, size, block in (("M", m, blocks.m), ("N", n, blocks.n), ("K", k, blocks.k)):
        if size % block:
            raise ValueError(f"norm_conv: {name}={size} is not a multiple of its block {block}")


def _combine(tile_mean: jax.Array, tile_m2: jax.Array, rows: int) -> tuple[jax.Array, jax.Array]:
    """Column mean and biased variance from tiles of `rows` rows each (Chan et al.)."""
    mean = tile_mean.mean(0)
    m2 = tile_m2.sum(0) + rows * jnp.square(tile_mean - mean).sum(0)
    return mean, m2 / (rows * tile_mean.shape[0])


def _pallas_forward(x, in_scale, in_bias, w, blocks: Blocks, interpret: bool):
    (m, k), n = x.shape, w.shape[1]
    prologue = in_scale is not None
    if not prologue:  # the kernel's signature is fixed; unused refs are never read
        in_scale = in_bias = jnp.zeros((k,), F32)
    tiles = (m // blocks.m, n // blocks.n)
    from jax.experimental.pallas import triton as pl_triton

    y, tile_mean, tile_m2 = pl.pallas_call(
        functools.partial(_kernel, blocks=blocks, prologue=prologue),
        grid=tiles,
        in_specs=[
            pl.BlockSpec((blocks.m, k), lambda i, j: (i, 0)),
            pl.BlockSpec((k,), lambda i, j: (0,)),
            pl.BlockSpec((k,), lambda i, j: (0,)),
            pl.BlockSpec((k, blocks.n), lambda i, j: (0, j)),
        ],
        out_specs=[
            pl.BlockSpec((blocks.m, blocks.n), lambda i, j: (i, j)),
            pl.BlockSpec((1, blocks.n), lambda i, j: (i, j)),
            pl.BlockSpec((1, blocks.n), lambda i, j: (i, j)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((m, n), x.dtype),
            jax.ShapeDtypeStruct((tiles[0], n), F32),
            jax.ShapeDtypeStruct((tiles[0], n), F32),
        ],
        compiler_params=pl_triton.CompilerParams(num_warps=blocks.warps, num_stages=blocks.stages),
        interpret=interpret,
        name="norm_conv",
    )(x, in_scale.astype(F32), in_bias.astype(F32), w.astype(x.dtype))
    mean, var = _combine(tile_mean, tile_m2, blocks.m)
    return y, mean, var


def _cotangent(dy, y, mean, d_mean, d_var, rows: int):
    """The cotangent of y (float32) with those of its mean and biased variance folded in:
    dy + d_mean / M + d_var * 2 (y - mean) / M (the d/dmean term of var sums to zero)."""
    return dy.astype(F32) + d_mean / rows + d_var * (2.0 / rows) * (y.astype(F32) - mean)


def _dgrad_kernel(
    dy_ref,
    y_ref,
    mean_ref,
    dmean_ref,
    dvar_ref,
    w_ref,
    x_ref,
    scale_ref,
    bias_ref,
    dx_ref,
    dscale_ref,
    dbias_ref,
    *,
    blocks,
    prologue,
    rows,
):
    """One (blocks.m, blocks.n) tile of dx = (g @ w.T) * relu'(z) * scale, and its column
    sums of dz * x and dz (the prologue's parameter gradients)."""
    n_total = dy_ref.shape[1]

    def step(i, acc):
        ns = pl.ds(i * blocks.k, blocks.k)
        g = _cotangent(dy_ref[:, ns], y_ref[:, ns], mean_ref[ns], dmean_ref[ns], dvar_ref[ns], rows)
        return acc + jax.lax.dot_general(
            g.astype(dy_ref.dtype),
            w_ref[:, ns],
            (((1,), (1,)), ((), ())),
            preferred_element_type=F32,
        )

    dh = jax.lax.fori_loop(0, n_total // blocks.k, step, jnp.zeros((blocks.m, blocks.n), F32))
    if not prologue:
        dx_ref[...] = dh.astype(dx_ref.dtype)
        return
    x = x_ref[...].astype(F32)
    scale = scale_ref[...]
    dz = jnp.where(x * scale + bias_ref[...] > 0, dh, 0.0)
    dx_ref[...] = (dz * scale).astype(dx_ref.dtype)
    dscale_ref[...] = jnp.sum(dz * x, axis=0)[None]
    dbias_ref[...] = jnp.sum(dz, axis=0)[None]


def _wgrad_kernel(
    x_ref,
    scale_ref,
    bias_ref,
    dy_ref,
    y_ref,
    mean_ref,
    dmean_ref,
    dvar_ref,
    dw_ref,
    *,
    blocks,
    prologue,
    rows,
):
    """One split of rows' (blocks.k, blocks.n) tile of dw = h.T @ g."""
    split_rows = x_ref.shape[0]

    def step(i, acc):
        ms = pl.ds(i * blocks.m, blocks.m)
        h = x_ref[ms, :]
        if prologue:
            h = _prologue(h, scale_ref[...], bias_ref[...])
        g = _cotangent(
            dy_ref[ms, :], y_ref[ms, :], mean_ref[...], dmean_ref[...], dvar_ref[...], rows
        )
        return acc + jax.lax.dot_general(
            h.astype(x_ref.dtype),
            g.astype(x_ref.dtype),
            (((0,), (0,)), ((), ())),
            preferred_element_type=F32,
        )

    acc = jax.lax.fori_loop(0, split_rows // blocks.m, step, jnp.zeros((blocks.k, blocks.n), F32))
    dw_ref[...] = acc[None]


def _split_rows(m: int, block: int, cap: int = 8192) -> int:
    """Rows per wgrad split: the largest power of two dividing m, at most `cap`, >= block."""
    rows = m & -m
    return max(min(rows, cap), block)


def _params(blocks: Blocks):
    from jax.experimental.pallas import triton as pl_triton

    return pl_triton.CompilerParams(num_warps=blocks.warps, num_stages=blocks.stages)


def _pallas_backward(
    x,
    in_scale,
    in_bias,
    w,
    y,
    mean,
    dy,
    d_mean,
    d_var,
    dgrad: Blocks,
    wgrad: Blocks,
    interpret: bool,
):
    (m, k), n = x.shape, w.shape[1]
    prologue = in_scale is not None
    scale = in_scale.astype(F32) if prologue else jnp.zeros((k,), F32)
    bias = in_bias.astype(F32) if prologue else jnp.zeros((k,), F32)
    w = w.astype(x.dtype)
    stats = (mean, d_mean.astype(F32), d_var.astype(F32))
    vec_n = pl.BlockSpec((n,), lambda i, j: (0,))
    tiles = (m // dgrad.m, k // dgrad.n)
    dx, tile_dscale, tile_dbias = pl.pallas_call(
        functools.partial(_dgrad_kernel, blocks=dgrad, prologue=prologue, rows=m),
        grid=tiles,
        in_specs=[
            pl.BlockSpec((dgrad.m, n), lambda i, j: (i, 0)),
            pl.BlockSpec((dgrad.m, n), lambda i, j: (i, 0)),
            vec_n,
            vec_n,
            vec_n,
            pl.BlockSpec((dgrad.n, n), lambda i, j: (j, 0)),
            pl.BlockSpec((dgrad.m, dgrad.n), lambda i, j: (i, j)),
            pl.BlockSpec((dgrad.n,), lambda i, j: (j,)),
            pl.BlockSpec((dgrad.n,), lambda i, j: (j,)),
        ],
        out_specs=[
            pl.BlockSpec((dgrad.m, dgrad.n), lambda i, j: (i, j)),
            pl.BlockSpec((1, dgrad.n), lambda i, j: (i, j)),
            pl.BlockSpec((1, dgrad.n), lambda i, j: (i, j)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((m, k), x.dtype),
            jax.ShapeDtypeStruct((tiles[0], k), F32),
            jax.ShapeDtypeStruct((tiles[0], k), F32),
        ],
        compiler_params=_params(dgrad),
        interpret=interpret,
        name="norm_conv_dgrad",
    )(dy, y, *stats, w, x, scale, bias)
    rows = _split_rows(m, wgrad.m)
    splits = m // rows
    vec_bn = pl.BlockSpec((wgrad.n,), lambda s, i, j: (j,))
    vec_bk = pl.BlockSpec((wgrad.k,), lambda s, i, j: (i,))
    partial_dw = pl.pallas_call(
        functools.partial(_wgrad_kernel, blocks=wgrad, prologue=prologue, rows=m),
        grid=(splits, k // wgrad.k, n // wgrad.n),
        in_specs=[
            pl.BlockSpec((rows, wgrad.k), lambda s, i, j: (s, i)),
            vec_bk,
            vec_bk,
            pl.BlockSpec((rows, wgrad.n), lambda s, i, j: (s, j)),
            pl.BlockSpec((rows, wgrad.n), lambda s, i, j: (s, j)),
            vec_bn,
            vec_bn,
            vec_bn,
        ],
        out_specs=pl.BlockSpec((1, wgrad.k, wgrad.n), lambda s, i, j: (s, i, j)),
        out_shape=jax.ShapeDtypeStruct((splits, k, n), F32),
        compiler_params=_params(wgrad),
        interpret=interpret,
        name="norm_conv_wgrad",
    )(x, scale, bias, dy, y, *stats)
    dw = partial_dw.sum(0)
    if not prologue:
        return dx, None, None, dw
    return dx, tile_dscale.sum(0), tile_dbias.sum(0), dw


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _norm_conv(x, in_scale, in_bias, w, blocks, dgrad, wgrad, interpret):
    return _pallas_forward(x, in_scale, in_bias, w, blocks, interpret)


def _norm_conv_fwd(x, in_scale, in_bias, w, blocks, dgrad, wgrad, interpret):
    y, mean, var = _pallas_forward(x, in_scale, in_bias, w, blocks, interpret)
    return (y, mean, var), (x, in_scale, in_bias, w, y, mean)


def _norm_conv_bwd(blocks, dgrad, wgrad, interpret, residuals, cotangents):
    x, in_scale, in_bias, w, y, mean = residuals
    dy, d_mean, d_var = cotangents
    if dgrad is not None:
        dx, d_scale, d_bias, dw = _pallas_backward(
            x, in_scale, in_bias, w, y, mean, dy, d_mean, d_var, dgrad, wgrad, interpret
        )
        if in_scale is None:
            return dx, None, None, dw.astype(w.dtype)
        return dx, d_scale.astype(in_scale.dtype), d_bias.astype(in_bias.dtype), dw.astype(w.dtype)
    rows = x.shape[0]
    g = _cotangent(dy, y, mean, d_mean, d_var, rows).astype(x.dtype)
    h = _prologue(x, in_scale, in_bias).astype(x.dtype)
    dw = jnp.dot(h.T, g, preferred_element_type=F32).astype(w.dtype)
    dh = jnp.dot(g, w.astype(x.dtype).T, preferred_element_type=F32)
    if in_scale is None:
        return dh.astype(x.dtype), None, None, dw
    z = x.astype(F32) * in_scale.astype(F32) + in_bias.astype(F32)
    dz = jnp.where(z > 0, dh, 0.0)
    dx = (dz * in_scale.astype(F32)).astype(x.dtype)
    d_scale = (dz * x.astype(F32)).sum(0).astype(in_scale.dtype)
    return dx, d_scale, dz.sum(0).astype(in_bias.dtype), dw


_norm_conv.defvjp(_norm_conv_fwd, _norm_conv_bwd)


def norm_conv(
    x: jax.Array,
    in_scale: jax.Array | None,
    in_bias: jax.Array | None,
    w: jax.Array,
    *,
    tiling: Tiling | None = None,
    interpret: bool | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """relu(x * in_scale + in_bias) @ w and the result's column statistics.

    x: (M, K) rows (bf16 or float32); in_scale, in_bias: (K,) float32, or both None for no
    prologue; w: (K, N). Returns (y (M, N) in x.dtype, mean (N,) float32, biased var (N,)
    float32). `tiling` defaults to `choose_tiling`'s; M, N, K must be multiples of its
    blocks. Differentiable in x, in_scale, in_bias and w, also through mean and var.
    `interpret` runs the Pallas interpreter (default: on a CPU backend).
    """
    if (in_scale is None) != (in_bias is None):
        raise ValueError("norm_conv: give both in_scale and in_bias, or neither")
    if tiling is None:
        tiling = choose_tiling(x.shape[0], x.shape[1], w.shape[1], in_scale is not None)
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    _check(x, w, tiling.forward)
    if tiling.dgrad is not None and not _backward_fits(
        *x.shape, w.shape[1], tiling.dgrad, tiling.wgrad
    ):
        raise ValueError(f"norm_conv: the backward's blocks do not tile {x.shape} @ {w.shape}")
    return _norm_conv(
        x, in_scale, in_bias, w, tiling.forward, tiling.dgrad, tiling.wgrad, interpret
    )
