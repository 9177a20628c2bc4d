"""One run per workdir: an exclusive `flock` on `<workdir>/.lock`.

The lock file records the holder's pid and host name, which a refused run names. The kernel
releases a `flock` when its holder exits, killed included (`kill -9`), so a lock left by a dead
run never blocks the next one. The holder deletes the file when it lets go; a run that finds
the file deleted under it right after locking it tries again (a lock on a deleted file guards
nothing). In a multi-process run only process 0 takes the lock, and every process learns
whether it did.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import jax
import numpy as np

LOCK_FILE = ".lock"


class WorkdirLockedError(FileExistsError):
    """Another run holds the workdir; the message names its pid and host. (A FileExistsError:
    the programs report it as a usage error, exit status 2.)"""


class WorkdirLock:
    """The exclusive lock of one workdir: `acquire()` or raise `WorkdirLockedError`, then
    `release()`. A second `WorkdirLock` of the same workdir conflicts, in this process too."""

    def __init__(self, workdir: str | os.PathLike):
        self.workdir = Path(workdir).absolute()
        self.path = self.workdir / LOCK_FILE
        self._fd: int | None = None
        self._made: list[Path] = []  # the folders `acquire` created, innermost first

    def acquire(self) -> None:
        """Take the lock at once (creating the workdir if needed), recording this process's pid
        and host in the lock file; `WorkdirLockedError` naming the holder if another has it."""
        self._made = [p for p in (self.workdir, *self.workdir.parents) if not p.exists()]
        self.workdir.mkdir(parents=True, exist_ok=True)
        while self._fd is None:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 200).decode(errors="replace").strip()
                os.close(fd)
                raise WorkdirLockedError(self._refusal(holder)) from None
            if self._still_named(fd):
                self._fd = fd
            else:
                os.close(fd)
        os.ftruncate(self._fd, 0)
        os.write(self._fd, f"pid {os.getpid()} on host {socket.gethostname()}\n".encode())

    def release(self) -> None:
        """Let go: delete the lock file, unlock, and remove the folders `acquire` made again
        if nothing else was written there."""
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        os.close(self._fd)
        self._fd = None
        with contextlib.suppress(OSError):  # not empty: the run wrote its outputs
            for folder in self._made:
                folder.rmdir()

    def _still_named(self, fd: int) -> bool:
        """Whether the locked file is still the one at `self.path` (its holder may have
        deleted it between our open and our lock)."""
        try:
            return os.path.samestat(os.fstat(fd), os.stat(self.path))
        except FileNotFoundError:
            return False

    def _refusal(self, holder: str) -> str:
        who = holder or "another process (starting up)"
        return (
            f"workdir {self.workdir} is in use by another run ({who}; lock file {self.path}); "
            "wait for it to finish or choose another --workdir"
        )


@contextlib.contextmanager
def hold_workdir(workdir: str | os.PathLike) -> Iterator[None]:
    """Inside: this run holds `workdir`'s lock (process 0 takes it; with several processes,
    all raise `WorkdirLockedError` if process 0 could not)."""
    lock = WorkdirLock(workdir)
    refused = None
    if jax.process_index() == 0:
        try:
            lock.acquire()
        except OSError as err:  # held by another run, or the workdir cannot be made
            refused = err
    if jax.process_count() > 1 and not _process_zero_agrees(refused is None):
        refused = refused or WorkdirLockedError(
            f"workdir {lock.workdir} is in use by another run (process 0 could not lock it)"
        )
    if refused is not None:
        raise refused
    try:
        yield
    finally:
        lock.release()


def _process_zero_agrees(locked: bool) -> bool:
    """Process 0's `locked`, on every process."""
    from jax.experimental import multihost_utils

    return int(multihost_utils.broadcast_one_to_all(np.int32(locked))) == 1
