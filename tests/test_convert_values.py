"""What load_torch_state_dict refuses (non-float, NaN/inf tensors) and what export returns."""

from __future__ import annotations

import numpy as np
import pytest
from flax import nnx

import flax_attention as fa
from flax_attention.convert import load_torch_state_dict, to_torch_state_dict


@pytest.fixture
def se() -> fa.SE:
    return fa.SE(32, 4, rngs=nnx.Rngs(0))


def _kernels(module: fa.SE) -> list[np.ndarray]:
    return [np.asarray(module.fc1.kernel.get_value()), np.asarray(module.fc2.kernel.get_value())]


@pytest.mark.parametrize("strict", [True, False])
def test_non_float_and_non_finite_tensors_are_refused_before_anything_is_written(se, strict):
    state = {k: np.array(v) for k, v in to_torch_state_dict(se).items()}
    before = _kernels(se)
    state["fc.0.weight"] = np.ones_like(state["fc.0.weight"], dtype=np.int64)
    state["fc.2.weight"][0, 0] = np.nan
    state["fc.2.bias"][:2] = np.inf
    with pytest.raises(ValueError) as info:
        load_torch_state_dict(se, state, strict=strict)
    message = str(info.value)
    assert "fc.0.weight: dtype int64 is not floating point" in message
    assert "fc.2.weight: 1 NaN/inf values" in message and "fc.2.bias: 2 NaN/inf values" in message
    for got, want in zip(_kernels(se), before, strict=True):
        np.testing.assert_array_equal(got, want)


def test_half_precision_tensors_load(se):
    state = {k: v.astype(np.float16) for k, v in to_torch_state_dict(se).items()}
    assert load_torch_state_dict(se, state).ok


def test_exported_arrays_are_writable_copies(se):
    exported = to_torch_state_dict(se)
    assert all(a.flags.writeable and a.flags.c_contiguous for a in exported.values())
    exported["fc.2.bias"][:] = 7.0  # does not reach the module
    assert not np.any(np.asarray(se.fc2.bias.get_value()) == 7.0)
