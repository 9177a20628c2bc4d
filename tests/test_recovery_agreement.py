"""Checkpoint recovery that processes agree on, and read errors that are not corruption."""

from __future__ import annotations

import errno
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from flax_attention.training import checkpointing
from flax_attention.training.checkpointing import CheckpointReadError, TrainCheckpointer

STEPS = (2, 4)
TESTS = Path(__file__).parent


def state_at(step: int) -> dict[str, jax.Array]:
    return {"w": jnp.arange(8, dtype=jnp.float32) * step}


def abstract_state() -> dict[str, jax.ShapeDtypeStruct]:
    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return {"w": jax.ShapeDtypeStruct((8,), jnp.float32, sharding=sharding)}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A checkpoint directory holding steps 2 and 4 of a tiny state."""
    directory = tmp_path_factory.mktemp("saved") / "checkpoints"
    manager = TrainCheckpointer(directory, async_save=False)
    for step in STEPS:
        manager.save(step, state_at(step), {"next_index": step})
    manager.close()
    return directory


def damage(step_dir) -> None:
    """Delete one array data file of the step (a lost file on one host's view)."""
    files = sorted(
        p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"
    )
    assert files, list(step_dir.rglob("*"))
    files[0].unlink()


TRANSIENT = {
    "EIO": lambda path: OSError(errno.EIO, "Input/output error", path),
    "tensorstore": lambda path: ValueError(f"UNAVAILABLE: Error reading {path}: timed out"),
}


@pytest.mark.parametrize("error", TRANSIENT.values(), ids=TRANSIENT.keys())
def test_a_transient_read_error_is_retried_and_renames_nothing(saved, tmp_path, monkeypatch, error):
    directory = tmp_path / "checkpoints"
    shutil.copytree(saved, directory)
    restore, failures = ocp.CheckpointManager.restore, []

    def flaky(self, step, *args, **kwargs):
        if step == 4 and len(failures) < 2:
            failures.append(step)
            raise error(str(directory / "4"))
        return restore(self, step, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "restore", flaky)
    monkeypatch.setattr(checkpointing, "RETRY_DELAY_S", 0.01)
    manager = TrainCheckpointer(directory)
    state, data_state, step = manager.restore_latest(abstract_state())
    manager.close()
    assert failures == [4, 4] and step == 4 and data_state == {"next_index": 4}
    np.testing.assert_array_equal(state["w"], state_at(4)["w"])
    assert sorted(p.name for p in directory.iterdir()) == ["2", "4"]


def test_a_read_error_that_persists_stops_the_run_and_renames_nothing(saved, tmp_path, monkeypatch):
    directory = tmp_path / "checkpoints"
    shutil.copytree(saved, directory)

    def failing(self, step, *args, **kwargs):
        raise OSError(errno.EIO, "Input/output error", str(directory / str(step)))

    monkeypatch.setattr(ocp.CheckpointManager, "restore", failing)
    monkeypatch.setattr(checkpointing, "RETRY_DELAY_S", 0.01)
    manager = TrainCheckpointer(directory)
    with pytest.raises(CheckpointReadError, match=r"cannot read checkpoint .*4.*Input/output"):
        manager.restore_latest(abstract_state())
    manager.close()
    assert sorted(p.name for p in directory.iterdir()) == ["2", "4"]


PROCESS = textwrap.dedent(
    """
    import sys
    import jax

    pid, port, directory = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid)
    import test_recovery_agreement as t
    from flax_attention.training.checkpointing import TrainCheckpointer

    manager = TrainCheckpointer(directory)
    state, data_state, step = manager.restore_latest(t.abstract_state())
    manager.close()
    assert float(state["w"][1]) == step, (state, step)
    print("resumed from", step, "process", pid, flush=True)
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_processes_agree_on_the_newest_step_that_all_of_them_can_read(saved, tmp_path):
    """Process 1 sees step 4 damaged (each process here reads its own copy: one host's view):
    both resume from step 2, and only process 0 moves step 4 aside (before, process 0 resumed
    from step 4 and process 1 waited alone at the move-aside barrier)."""
    copies = [tmp_path / f"process{pid}" for pid in (0, 1)]
    for copy in copies:
        shutil.copytree(saved, copy)
    damage(copies[1] / "4")
    script = tmp_path / "run.py"
    script.write_text(PROCESS)
    port = str(_free_port())
    pythonpath = os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(TESTS)]))
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(pid), port, str(copies[pid])],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "PYTHONPATH": pythonpath},
        )
        for pid in (0, 1)
    ]
    outputs = []
    for proc in procs:
        try:
            outputs.append(proc.communicate(timeout=90)[0])
        except subprocess.TimeoutExpired:
            for other in procs:
                other.kill()
            pytest.fail("the processes did not agree: one waited at a barrier (hang)")
    for pid, (proc, out) in enumerate(zip(procs, outputs, strict=True)):
        assert proc.returncode == 0, f"process {pid} failed:\n{out[-3000:]}"
        assert f"resumed from 2 process {pid}" in out
    assert sorted(p.name for p in copies[0].iterdir()) == ["2", "4.corrupt"]
    assert sorted(p.name for p in copies[1].iterdir()) == ["2", "4"]  # process 1 moves nothing
    assert "moved the refused checkpoint aside" in outputs[0]
    assert "moved" not in outputs[1]
