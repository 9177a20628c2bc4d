"""The test run's own setup (tests/conftest.py): one XLA compilation cache for the whole run."""

import os
import tempfile
from pathlib import Path

import jax


def test_the_run_compiles_into_one_fresh_cache_that_started_processes_inherit():
    """JAX and the environment (which pytest's workers and the tests' subprocesses inherit)
    name the same folder, a new one under the temporary directory."""
    folder = os.environ.get("JAX_COMPILATION_CACHE_DIR")
    assert folder and jax.config.jax_compilation_cache_dir == folder
    assert Path(folder).is_dir() and Path(folder).parent == Path(tempfile.gettempdir())
    assert Path(folder).name.startswith("flax-attention-xla-")
