import sys; sys.path.insert(0, ".devrun")
"""Lab: CBAM spatial conv 'shifts' with/without optimization barriers, in cbam_resnet50's step."""
import gzip, json, os, sys
from contextlib import nullcontext
import jax
from flax_attention.layers import tap_convs as T
from benchmarks.experiments.spatial_convs import spatial_table

import wgrad as W
ORIG = T._narrow_sum
ORIG_KG = T._narrow_kernel_grad


def barrier_sum(x, kernel, dilation):
    return jax.lax.optimization_barrier(ORIG(x, kernel, dilation))


TABLE = {3136: "conv", 784: "im2col", 196: "conv", 49: "shifts"}
VARIANTS = {  # name -> (table overrides, kernel-grad formulation)
    "c0": ({}, ORIG_KG),
    "g1": ({3136: "shifts"}, W.kgrad_gather),
    "s1": ({3136: "shifts"}, W.kgrad_stack0),
    "p1": ({3136: "shifts"}, W.kgrad_pertap),
    "g13": ({3136: "shifts", 196: "shifts"}, W.kgrad_gather),
    "g123": ({3136: "shifts", 784: "shifts", 196: "shifts"}, W.kgrad_gather),
}


def bench(variants, rounds):
    from benchmarks import train
    from benchmarks.common import Settings, jax_sync, time_fn
    from benchmarks.profiling import profile_calls
    out = os.environ.get("OUT", "/tmp")
    s = Settings.make(False)
    s.samples, s.sample_ms = 6, 300.0
    steps = {}
    for v in variants:
        if v == "resnet50":
            steps[v] = train.flax_step("resnet50", "auto", train.BATCH, train.IMAGE, s.inputs)
            continue
        over, kg = VARIANTS[v]
        T._narrow_kernel_grad = kg
        with spatial_table("cbam", {**TABLE, **over}):
            steps[v] = train.flax_step("cbam_resnet50", "auto", train.BATCH, train.IMAGE, s.inputs)
        T._narrow_kernel_grad = ORIG_KG
        print("compiled", v, round(steps[v].compile_s, 1), "peak GB", round((steps[v].peak_bytes or 0) / 2**30, 2), flush=True)
    res = {v: [] for v in steps}
    for r in range(rounds):
        for v, st in steps.items():
            t = time_fn(st, st.data, jax_sync, s)
            res[v].append(round(train.BATCH / t.median_ms * 1e3, 1))
        print("round", r, {v: x[-1] for v, x in res.items()}, flush=True)
    print("median img/s", {v: sorted(x)[len(x) // 2] for v, x in res.items()}, flush=True)
    json.dump(res, open(f"{out}/cbam_ab.json", "w"))
    for v, st in steps.items():
        if v == "resnet50":
            continue
        hlo = st.compiled.as_text()
        prof = profile_calls(lambda i: st(*st.data[i % 2]), 5, hlo)
        ops = [{k: o[k] for k in ("op", "ms", "launches", "category", "bytes", "source", "hlo")} for o in prof["ops"]]
        with gzip.open(f"{out}/{v}_ops.json.gz", "wt") as f:
            json.dump({"device_ms": prof["device_ms"], "categories": prof["categories"], "ops": ops}, f)
        if v in ("g1",):
            with gzip.open(f"{out}/{v}.hlo.txt.gz", "wt") as f:
                f.write(hlo)
        print("profile", v, prof["device_ms"], flush=True)


if __name__ == "__main__":
    bench(sys.argv[1].split(","), int(sys.argv[2]))
