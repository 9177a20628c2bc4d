"""Lab: narrow-conv kernel-gradient formulations (HWIO), taps on a major axis."""
import jax, jax.numpy as jnp
from jax import lax

F32 = jnp.float32


def _padded_cnhw(x, size, dilation):
    pad = dilation * (size - 1) // 2
    xp = jnp.pad(x.astype(F32), ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    return xp.transpose(3, 0, 1, 2)  # (C_in, N, H + 2p, W + 2p)


def kgrad_gather(x, dy, shape, dilation):
    size, _, cin, cout = shape
    n, h, w, _ = x.shape
    xp = _padded_cnhw(x, size, dilation)
    ti, tj = jnp.divmod(jnp.arange(size * size), size)
    taps = jax.vmap(lambda i, j: lax.dynamic_slice(xp, (0, 0, i * dilation, j * dilation), (cin, n, h, w)))(ti, tj)
    dyt = dy.astype(F32).transpose(3, 0, 1, 2)  # (C_out, N, H, W)
    dk = jnp.sum(taps[:, :, None] * dyt[None, None], axis=(3, 4, 5))  # (T, C_in, C_out)
    return dk.reshape(size, size, cin, cout)


def kgrad_stack0(x, dy, shape, dilation):
    size, _, cin, cout = shape
    n, h, w, _ = x.shape
    xp = _padded_cnhw(x, size, dilation)
    taps = jnp.stack([xp[:, :, i * dilation : i * dilation + h, j * dilation : j * dilation + w] for i in range(size) for j in range(size)])
    dyt = dy.astype(F32).transpose(3, 0, 1, 2)
    dk = jnp.sum(taps[:, :, None] * dyt[None, None], axis=(3, 4, 5))
    return dk.reshape(size, size, cin, cout)


def kgrad_pertap(x, dy, shape, dilation):
    """one reduction per tap (XLA may fuse the siblings into one multi-output reduction)."""
    size, _, cin, cout = shape
    n, h, w, _ = x.shape
    xp = _padded_cnhw(x, size, dilation)
    dyt = dy.astype(F32).transpose(3, 0, 1, 2)
    out = [jnp.sum(xp[:, None, :, i * dilation : i * dilation + h, j * dilation : j * dilation + w] * dyt[None], axis=(2, 3, 4)) for i in range(size) for j in range(size)]
    return jnp.stack(out).reshape(size, size, cin, cout)
