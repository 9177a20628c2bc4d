"""The training step and every Pallas kernel compiled for TPU on this CPU host (libtpu's
compile-only devices; nothing runs). libtpu is in the test extra: where it installs (linux
x86_64) a missing libtpu fails these tests rather than skipping them."""

import importlib.util
import platform
import re
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from flax_attention import kernels
from flax_attention.training.collectives import count_collectives
from flax_attention.training.tpu_topology import (
    StepShape,
    compile_for_chip,
    compile_train_step,
    topology_devices,
)

pytestmark = pytest.mark.skipif(
    not (sys.platform == "linux" and platform.machine() in ("x86_64", "AMD64")),
    reason="libtpu (the TPU compiler) installs only on linux x86_64",
)


@pytest.fixture(scope="module")
def v5e_chips() -> list[jax.Device]:
    """The 4 chips of a v5e 2x2 slice."""
    if importlib.util.find_spec("libtpu") is None:
        pytest.fail("libtpu is missing: pip install -e '.[test]' -c constraints.txt pins it")
    return topology_devices("v5e:2x2")


def test_a_slice_has_one_device_per_chip(v5e_chips):
    """v5e 2x2 is 4 chips; v4 2x2x1 too, in megacore mode (libtpu's default is a device per
    TensorCore: 8)."""
    assert [d.platform for d in v5e_chips] == ["tpu"] * 4
    assert len(topology_devices("v4:2x2x1")) == 4


def test_resnet18_training_step_compiles_for_a_v5e_slice(v5e_chips):
    """The `jit` form's real step (bf16, exact global BatchNorm, batch sharded over 4 chips)
    compiles for TPU: it fits a chip, averages the gradients in one all-reduce and reduces
    BatchNorm statistics across the chips."""
    compiled = compile_train_step(StepShape("resnet18", per_chip_batch=8, image_size=32), v5e_chips)
    memory = compiled.memory_analysis()
    used = memory.argument_size_in_bytes + memory.temp_size_in_bytes
    params = 11_689_512  # resnet18's parameters (float32) and the momentum: 2 x 4 bytes each
    assert 8 * params < used < 16 * 2**30
    hlo = compiled.as_text()
    assert "replica_groups={{0,1,2,3}}" in hlo
    # float32 gradients and metrics averaged as one vector: an all-reduce of that many floats
    assert re.search(rf"f32\[{params + 3}\]\S* all-reduce\(", hlo)
    assert count_collectives(hlo)["total"] > 20  # BatchNorm's statistics, each layer each way
    assert compiled.cost_analysis()["flops"] > 0


def _pallas_modules() -> set[str]:
    package = Path(kernels.__file__).parent
    return {
        f"flax_attention.kernels.{path.stem}"
        for path in package.glob("*.py")
        if "pallas_call" in path.read_text() and path.stem != "__init__"
    }


def test_every_pallas_kernel_compiles_for_tpu(v5e_chips):
    """Every module of `flax_attention.kernels` that calls `pallas_call` has an entry in
    `PALLAS_KERNELS` (none does today), and each entry lowers through Mosaic TPU (a
    `tpu_custom_call`, not the interpreter)."""
    registered = {k.fn.__module__ for k in kernels.PALLAS_KERNELS}
    assert _pallas_modules() <= registered
    for kernel in kernels.PALLAS_KERNELS:
        compiled = compile_for_chip(kernel.fn, kernel.example_args(), v5e_chips[0])
        assert "tpu_custom_call" in compiled.as_text(), kernel.name


def test_a_pallas_call_compiles_through_mosaic(v5e_chips):
    """The compile path the kernel test uses lowers a `pallas_call` through Mosaic TPU."""
    from jax.experimental import pallas as pl

    def double(x_ref, o_ref):
        o_ref[...] = x_ref[...] * 2

    def fn(x):
        return pl.pallas_call(double, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype))(x)

    args = (jax.ShapeDtypeStruct((8, 128), jnp.float32),)
    assert "tpu_custom_call" in compile_for_chip(fn, args, v5e_chips[0]).as_text()
