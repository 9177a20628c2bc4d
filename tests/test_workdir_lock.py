"""One run per workdir: a second run is refused at once naming the holder, a killed holder's
lock is taken over, only process 0 of a multi-process run locks."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

import pytest

from flax_attention import data
from flax_attention.cli.train import main as train_main
from flax_attention.training import workdir_lock
from flax_attention.training.workdir_lock import (
    LOCK_FILE,
    WorkdirLock,
    WorkdirLockedError,
    hold_workdir,
)

HOLDER = """
import sys, time
from flax_attention.training.workdir_lock import WorkdirLock
WorkdirLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(120)
"""


@pytest.fixture
def holder(tmp_path):
    """A process holding `tmp_path`'s lock (killed at the end)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline() == "locked\n"
        yield proc
    finally:
        proc.kill()
        proc.wait()


def test_a_second_lock_is_refused_naming_the_holder(tmp_path):
    first = WorkdirLock(tmp_path)
    first.acquire()
    with pytest.raises(WorkdirLockedError) as refused:
        WorkdirLock(tmp_path).acquire()
    assert f"pid {os.getpid()} on host {socket.gethostname()}" in str(refused.value)
    first.release()
    second = WorkdirLock(tmp_path)
    second.acquire()
    second.release()
    assert not (tmp_path / LOCK_FILE).exists()


def test_training_on_a_locked_workdir_exits_2_at_once_naming_the_holder(
    tmp_path, monkeypatch, capsys, holder
):
    def refuse(*args, **kwargs):
        raise AssertionError("data was read although the workdir is locked")

    monkeypatch.setattr(data, "data_source", refuse)
    assert train_main(["--workdir", str(tmp_path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert f"pid {holder.pid} on host {socket.gethostname()}" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK_FILE]


def test_the_lock_of_a_killed_holder_is_taken_over(tmp_path, holder):
    with pytest.raises(WorkdirLockedError, match=f"pid {holder.pid} "):
        WorkdirLock(tmp_path).acquire()
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert (tmp_path / LOCK_FILE).exists()  # left behind by the killed holder: stale
    lock = WorkdirLock(tmp_path)
    lock.acquire()
    assert f"pid {os.getpid()} " in (tmp_path / LOCK_FILE).read_text()
    lock.release()


def test_only_process_zero_takes_the_lock(tmp_path, monkeypatch):
    held = WorkdirLock(tmp_path)
    held.acquire()
    monkeypatch.setattr(workdir_lock.jax, "process_index", lambda: 1)
    with hold_workdir(tmp_path):  # process 1 shares the workdir of process 0
        pass
    held.release()


def test_a_workdir_made_for_the_lock_is_removed_if_nothing_was_written(tmp_path):
    workdir = tmp_path / "runs" / "new"
    with pytest.raises(RuntimeError), hold_workdir(workdir):
        assert (workdir / LOCK_FILE).exists()
        raise RuntimeError("the run failed before writing anything")
    assert list(tmp_path.iterdir()) == []
