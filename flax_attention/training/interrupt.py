"""Ctrl-C during training: stop after the current step and save, or abort on a second one."""

from __future__ import annotations

import signal
import threading

from tqdm import tqdm


class StopOnInterrupt:
    """First Ctrl-C asks the loop to stop after the current step (it then saves); a second
    one interrupts at once. Only in the main thread (signals go there)."""

    def __init__(self) -> None:
        self.requested = False
        self.previous = None

    def __enter__(self) -> StopOnInterrupt:
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, self.previous)
        tqdm.write("interrupt: saving a checkpoint after this step (Ctrl-C again to abort)")

    def __exit__(self, *exc) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
