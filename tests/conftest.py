"""Test-wide setup: 8 simulated CPU devices (set before JAX starts), float32 matmuls, and one
XLA compilation cache for the whole run: the pytest workers and the processes that tests start
inherit its folder, so a program whose compile took a second or more (JAX's threshold: a
model's training step, say) is loaded by every later test that builds it. The folder is new
for each run and removed after it."""

import atexit
import os
import shutil
import tempfile

# 8 simulated devices; LLVM's optimisation passes off, XLA's older elemental emitter for
# fusions instead of the MLIR fusion emitters, and each program's code generated on one thread:
# the tests are compile-bound (tiny models, a few steps each), so XLA's CPU compiles are
# shorter (about a third as long with the last two) and the slower machine code costs little.
# The same HLO runs; float32 rounding may differ in the last bits.
XLA_FLAGS = (
    "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
    " --xla_cpu_use_fusion_emitters=false --xla_cpu_parallel_codegen_split_count=1"
)
os.environ.setdefault("XLA_FLAGS", XLA_FLAGS)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:  # the first conftest of the run makes it
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="flax-attention-xla-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)

import jax  # noqa: E402  (after the environment it reads at import)

jax.config.update("jax_default_matmul_precision", "highest")


import pytest  # noqa: E402

TINY_MODEL = "tiny_se_resnet"  # one SE BasicBlock stage: fast to compile and run on CPU


@pytest.fixture
def tiny_model(monkeypatch) -> str:
    """Registers the tiny model ("tiny_se_resnet") for the test; returns its name."""
    from flax_attention.architectures import BasicBlock
    from flax_attention.models import MODELS, ModelSpec

    spec = ModelSpec(TINY_MODEL, BasicBlock, (1,), "test", "official", {"attention": "se"})
    monkeypatch.setitem(MODELS, TINY_MODEL, spec)
    return TINY_MODEL


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A tfds data_dir holding the embedded digits dataset, built once for the module."""
    from flax_attention import data

    path = tmp_path_factory.mktemp("tfds")
    data.build_digits(path)
    return path


@pytest.fixture(scope="module")
def odd_photo_dir(tmp_path_factory):
    """Photos with the odd kinds first (CMYK, grayscale, PNG bytes, a large one) then
    ordinary ones; small sizes so the CPU path stays fast."""
    path = tmp_path_factory.mktemp("odd_photos")
    from flax_attention.data import photos

    photos.write_photo_dataset(
        path,
        num_train=12,
        num_eval=5,
        heights=(60, 90),
        widths=(70, 100),
        odd_images=True,
        large_side=700,
    )
    return path
