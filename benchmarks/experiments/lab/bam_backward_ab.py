"""Lab: BAM backward variants in bam_resnet50's train step, interleaved timing + profile."""
import gzip, json, os, sys
from functools import partial
import jax, jax.numpy as jnp
from flax_attention.layers import bam as B
from flax_attention.layers.tap_convs import apply_conv, resolve

F32 = jnp.float32


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def attend(x, c, s, combine):
    return x * (1.0 + jax.nn.sigmoid(B.COMBINES[combine](c, s))).astype(x.dtype)


def _attend_fwd(x, c, s, combine):
    return attend(x, c, s, combine), (x, c, s)


def _attend_bwd(combine, res, dout):
    x, c, s = res
    a = B.COMBINES[combine](c, s)
    dof, xf = dout.astype(F32), x.astype(F32)
    t = jax.nn.sigmoid(a)
    dx = (dof * (1.0 + t).astype(x.dtype).astype(F32)).astype(x.dtype)
    # two reductions from distinct expressions, so that XLA recomputes instead of storing
    # the float32 d(pre-activation) they would share
    th = jnp.tanh(0.5 * a)
    ds_term = (dof * xf) * (0.25 * (1.0 - th * th))
    dc_term = (xf * dof) * (t - t * t)
    if combine == "product":
        ds_term, dc_term = ds_term * c, dc_term * s
    return dx, dc_term.sum((1, 2), keepdims=True), ds_term.sum(-1, keepdims=True)


attend.defvjp(_attend_fwd, _attend_bwd)


@jax.custom_vjp
def reduce_1x1(x, w, b):
    """x (N,H,W,C) @ w (C,K) + b, f32 accumulate, out in x dtype."""
    return (jnp.dot(x, w.astype(x.dtype), preferred_element_type=F32) + b).astype(x.dtype)


def _red_fwd(x, w, b):
    return reduce_1x1(x, w, b), (x, w)


def _red_bwd(res, dy):
    x, w = res
    dyf = dy.astype(F32)
    wf = w.astype(F32)
    dx = sum(dyf[..., k : k + 1] * wf[:, k] for k in range(w.shape[1]))
    dw = jnp.einsum("nhwc,nhwk->ck", x, dy, preferred_element_type=F32)
    return dx.astype(x.dtype), dw.astype(w.dtype), dyf.sum((0, 1, 2))


reduce_1x1.defvjp(_red_fwd, _red_bwd)

ORIG_BAM_CALL = B.BAM.__call__
ORIG_SP_CALL = B.BAMSpatialGate.__call__


def bam_call(self, x):
    B.check_nhwc(x, self.channels, "BAM")
    x = x.astype(self.dtype)
    c = self.channel(x).astype(F32)[:, None, None, :]
    return attend(x, c, self.spatial(x).astype(F32), self.combine)


def final_sum(conv, y):
    k = conv.kernel[...][0, 0, :, 0].astype(F32)
    out = jnp.sum(y.astype(F32) * k, axis=-1, keepdims=True) + conv.bias[...].astype(F32)
    return out.astype(conv.dtype)


def make_sp_call(elementwise_final, custom_reduce):
    def sp_call(self, x):
        form = resolve(self.spatial_conv, "bam", *x.shape[1:3])
        if custom_reduce:
            r = reduce_1x1(x, self.reduce.kernel[...][0, 0], self.reduce.bias[...])
        else:
            r = apply_conv(self.reduce, x, form)
        y = jax.nn.relu(self.reduce_bn(r))
        for conv, bn in zip(self.dilated, self.dilated_bn, strict=True):
            y = B.phase_conv3x3(conv, y) if form == "conv" else apply_conv(conv, y, form)
            y = jax.nn.relu(bn(y))
        return final_sum(self.final, y) if elementwise_final else apply_conv(self.final, y, form)
    return sp_call


VARIANTS = {
    "v0": (ORIG_BAM_CALL, ORIG_SP_CALL),
    "v1_attend": (bam_call, ORIG_SP_CALL),
    "v2_final": (bam_call, make_sp_call(True, False)),
    "v3_reduce": (bam_call, make_sp_call(True, True)),
    "v4_final_only": (ORIG_BAM_CALL, make_sp_call(True, False)),
}


def use(v):
    B.BAM.__call__, B.BAMSpatialGate.__call__ = VARIANTS[v]


def check():
    """values and grads of one BAM (f32) equal across variants."""
    from flax import nnx
    x = jax.random.normal(jax.random.key(1), (4, 16, 16, 64), F32)
    outs = {}
    for v in VARIANTS:
        use(v)
        m = B.BAM(64, rngs=nnx.Rngs(0))
        m.train()
        def loss(m, x):
            y = m(x)
            return jnp.sum(y * jnp.cos(y)), y
        (l, y), (gm, gx) = nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True)(m, x)
        outs[v] = (y, gx, jax.tree.leaves(nnx.state(gm, nnx.Param)))
    y0, gx0, gp0 = outs["v0"]
    for v, (y, gx, gp) in outs.items():
        e = [float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-30)) for a, b in zip([y, gx, *gp], [y0, gx0, *gp0])]
        big = [x for x, b in zip(e, [y0, gx0, *gp0]) if float(jnp.max(jnp.abs(b))) > 1e-3]
        tiny = max(float(jnp.max(jnp.abs(a))) for a, b in zip(gp, gp0) if float(jnp.max(jnp.abs(b))) <= 1e-3)
        print("check", v, f"max rel err {max(big):.2e} over {len(big)}; near-zero grads max {tiny:.1e}", flush=True)


def bench(variants, rounds):
    from benchmarks import train
    from benchmarks.common import Settings, jax_sync, time_fn
    from benchmarks.profiling import profile_calls
    out = os.environ.get("OUT", "/tmp")
    s = Settings.make(False)
    s.samples, s.sample_ms = 6, 300.0
    steps = {}
    for v in variants:
        name = "resnet50" if v == "resnet50" else "bam_resnet50"
        if v != "resnet50":
            use(v)
        steps[v] = train.flax_step(name, "auto", train.BATCH, train.IMAGE, s.inputs)
        print("compiled", v, round(steps[v].compile_s, 1), "peak GB", round((steps[v].peak_bytes or 0) / 2**30, 2), flush=True)
    res = {v: [] for v in steps}
    for r in range(rounds):
        for v, st in steps.items():
            t = time_fn(st, st.data, jax_sync, s)
            res[v].append(round(train.BATCH / t.median_ms * 1e3, 1))
        print("round", r, {v: x[-1] for v, x in res.items()}, flush=True)
    print("median img/s", {v: sorted(x)[len(x) // 2] for v, x in res.items()}, flush=True)
    for v, st in steps.items():
        if v == "resnet50":
            continue
        hlo = st.compiled.as_text()
        prof = profile_calls(lambda i: st(*st.data[i % 2]), 5, hlo)
        ops = [{k: o[k] for k in ("op", "ms", "launches", "category", "bytes", "source", "hlo")} for o in prof["ops"]]
        with gzip.open(f"{out}/{v}_ops.json.gz", "wt") as f:
            json.dump({"device_ms": prof["device_ms"], "categories": prof["categories"], "ops": ops}, f)
        print("profile", v, prof["device_ms"], flush=True)
    json.dump(res, open(f"{out}/bam_ab.json", "w"))


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "check":
        check()
    else:
        bench(sys.argv[2].split(","), int(sys.argv[3]))
