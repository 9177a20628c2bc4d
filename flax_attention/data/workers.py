"""Data loading worker processes that never outlive the process that started them.

grain starts its workers from its own prefetch threads, so ``prctl(PR_SET_PDEATHSIG)`` (which
fires when the *thread* that created a process exits) would kill healthy workers; instead every
worker runs ``exit_with_parent`` at start: a daemon thread that ends the worker as soon as its
parent process is gone (SIGKILL included), within ``PARENT_POLL_S`` seconds.
"""

from __future__ import annotations

import os
import threading
import time

PARENT_POLL_S = 0.5


def exit_with_parent(parent_pid: int, worker_index: int = 0, worker_count: int = 1) -> None:
    """Worker initialiser (grain ``worker_init_fn`` with ``parent_pid`` bound): end this process
    once ``parent_pid`` is no longer its parent."""
    del worker_index, worker_count  # grain passes them; every worker watches alike
    watchdog = threading.Thread(
        target=_watch_parent, args=(parent_pid,), name="exit-with-parent", daemon=True
    )
    watchdog.start()


def _watch_parent(parent_pid: int) -> None:
    """Poll the parent pid; exit the process at once (no cleanup to hang on) when it changes."""
    while os.getppid() == parent_pid:
        time.sleep(PARENT_POLL_S)
    os._exit(1)
