"""The benchmarks' tests run as the library's (tests/conftest.py): 8 simulated CPU devices (set
before JAX starts), float32 matmuls, and one XLA compilation cache folder for the whole run."""

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
