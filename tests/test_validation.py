"""Bad input gets a ValueError that names the problem, never an XLA shape error."""

from __future__ import annotations

import numpy as np
import pytest
from flax import nnx

import flax_attention as fa
from flax_attention.convert import (
    StateDictMismatchError,
    load_torch_state_dict,
    to_torch_state_dict,
)

R = nnx.Rngs(0)
MODULES = {
    "SE": lambda: fa.SE(64, rngs=R),
    "CBAM": lambda: fa.CBAM(64, rngs=R),
    "ChannelGate": lambda: fa.ChannelGate(64, rngs=R),
    "BAM": lambda: fa.BAM(64, rngs=R),
    "PSA": lambda: fa.PSA(64, 64, rngs=R),
}


@pytest.mark.parametrize("name", MODULES)
@pytest.mark.parametrize("shape", [(64,), (2, 64), (2, 5, 64), (1, 2, 5, 5, 64)])
def test_wrong_rank(name, shape):
    with pytest.raises(ValueError, match="rank-4 NHWC"):
        MODULES[name]()(np.zeros(shape, np.float32))


@pytest.mark.parametrize("name", MODULES)
def test_nchw_input_gets_a_hint(name):
    with pytest.raises(ValueError, match=r"looks like NCHW.*transpose\(0, 2, 3, 1\)"):
        MODULES[name]()(np.zeros((2, 64, 7, 5), np.float32))


@pytest.mark.parametrize("name", MODULES)
def test_wrong_channel_count(name):
    with pytest.raises(ValueError, match="built for 64 channels but the input has 32"):
        MODULES[name]()(np.zeros((2, 7, 5, 32), np.float32))


def test_spatial_gate_rank():
    with pytest.raises(ValueError, match="rank-4 NHWC"):
        fa.SpatialGate(rngs=R)(np.zeros((7, 5, 32), np.float32))


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: fa.SE(8, rngs=R), "hidden width"),
        (lambda: fa.SE(64, 0, rngs=R), "reduction"),
        (lambda: fa.CBAM(8, rngs=R), "hidden width"),
        (lambda: fa.CBAM(64, variant="paper", rngs=R), "variant='paper'"),
        (lambda: fa.CBAM(64, pool_types=("avg", "median"), rngs=R), "pool_types entry='median'"),
        (lambda: fa.CBAM(64, pool_types=(), rngs=R), "pool_types"),
        (lambda: fa.CBAM(64, kernel_size=6, rngs=R), "kernel_size"),
        (lambda: fa.BAM(8, rngs=R), "hidden width"),
        (lambda: fa.BAM(64, combine="max", rngs=R), "combine='max'"),
        (lambda: fa.BAM(64, dilation=0, rngs=R), "dilation"),
        (lambda: fa.PSA(64, 64, groups=(1, 4, 8, 3), rngs=R), "groups entry 3"),
        (lambda: fa.PSA(48, 64, groups=(1, 4, 8, 32), rngs=R), "groups entry 32"),
        (lambda: fa.PSA(64, 64, (3, 5, 7), rngs=R), "equal length"),
        (lambda: fa.PSA(64, 66, rngs=R), "multiple of the 4 branches"),
        (lambda: fa.PSA(64, 64, stride=0, rngs=R), "stride"),
        (lambda: fa.PSA(64, 64, (3, 5, 7, 8), rngs=R), "odd"),
        (lambda: fa.PSA(64, 64, reduction=32, rngs=R), "SE hidden width"),
    ],
)
def test_bad_constructor_arguments(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_unknown_layout_is_refused_before_any_key_is_compared():
    with pytest.raises(ValueError, match="layout='caffe'"):
        load_torch_state_dict(fa.SE(64, rngs=R), {}, layout="caffe")
    with pytest.raises(ValueError, match="layout='caffe'"):
        to_torch_state_dict(fa.SE(64, rngs=R), layout="caffe")


def test_module_without_that_layout():
    with pytest.raises(ValueError, match="BAM has no 'timm' PyTorch layout"):
        to_torch_state_dict(fa.BAM(64, rngs=R), layout="timm")


def test_state_dict_of_another_module_lists_every_key():
    bam_keys = to_torch_state_dict(fa.BAM(64, rngs=R))
    with pytest.raises(StateDictMismatchError) as err:
        load_torch_state_dict(fa.SE(64, rngs=R), bam_keys)
    message = str(err.value)
    for key in ("fc.0.weight", "fc.0.bias", "fc.2.weight", "fc.2.bias"):
        assert f"missing key: {key}" in message
    for key in bam_keys:
        assert f"unexpected key: {key}" in message
    assert len(err.value.report.unexpected) == len(bam_keys)


def test_mis_shaped_and_wrong_layout_keys():
    se = fa.SE(64, rngs=R)
    timm_keys = to_torch_state_dict(fa.SE(64, rngs=R), layout="timm")
    with pytest.raises(StateDictMismatchError, match=r"missing key: fc\.0\.weight"):
        load_torch_state_dict(se, timm_keys, layout="official")
    keys = to_torch_state_dict(se)
    keys["fc.0.weight"] = keys["fc.0.weight"].T
    with pytest.raises(
        StateDictMismatchError, match=r"fc.0.weight: expected \(4, 64\).*got \(64, 4\)"
    ):
        load_torch_state_dict(se, keys)


def test_strict_failure_writes_nothing_and_non_strict_loads_what_matches():
    se = fa.SE(64, rngs=R)
    before = to_torch_state_dict(se)
    source = to_torch_state_dict(fa.SE(64, rngs=nnx.Rngs(7)))
    partial = {"fc.0.weight": source["fc.0.weight"], "extra.weight": np.zeros(3)}
    with pytest.raises(StateDictMismatchError):
        load_torch_state_dict(se, partial)
    np.testing.assert_array_equal(to_torch_state_dict(se)["fc.0.weight"], before["fc.0.weight"])
    report = load_torch_state_dict(se, partial, strict=False)
    assert report.loaded == ["fc.0.weight"]
    assert report.unexpected == ["extra.weight"]
    assert report.missing == ["fc.0.bias", "fc.2.bias", "fc.2.weight"]
    np.testing.assert_array_equal(to_torch_state_dict(se)["fc.0.weight"], source["fc.0.weight"])


def test_prefix_and_num_batches_tracked_are_handled():
    source = to_torch_state_dict(fa.CBAM(64, rngs=nnx.Rngs(3)))
    wrapped = {f"module.{k}": v for k, v in source.items()}
    wrapped["module.SpatialGate.spatial.bn.num_batches_tracked"] = np.array(5)
    target = fa.CBAM(64, rngs=R)
    assert load_torch_state_dict(target, wrapped).ok
    exported = to_torch_state_dict(target)
    for key, value in source.items():
        np.testing.assert_array_equal(exported[key], value)
