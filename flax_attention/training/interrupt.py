"""Ctrl-C during training: stop after the current step and save, or abort on a second one."""

from __future__ import annotations

import os
import signal
import sys
import threading

from tqdm import tqdm

EXIT_INTERRUPTED = 130


class StopOnInterrupt:
    """First Ctrl-C asks the loop to stop after the current step (it then saves); a second
    one ends the process at once with status 130, whatever the main thread is doing.

    Python runs signal handlers only between bytecodes of the main thread, so a main thread
    inside a long native call (an XLA compile, a device wait, a checkpoint barrier) would hear
    neither press until that call returns. The signals are therefore also counted by a watcher
    thread reading the interpreter's wakeup file descriptor, to which the C-level handler writes
    each signal as it arrives. Active only in the main thread (signals go there).
    """

    def __init__(self) -> None:
        self.requested = False
        self._previous_handler = None
        self._previous_wakeup = -1
        self._pipe: tuple[int, int] | None = None
        self._presses = 0
        self._lock = threading.Lock()

    def __enter__(self) -> StopOnInterrupt:
        if threading.current_thread() is not threading.main_thread():
            return self
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)
        self._pipe = (read_fd, write_fd)
        self._previous_handler = signal.signal(signal.SIGINT, self._handle)
        self._previous_wakeup = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        threading.Thread(target=self._watch, args=(read_fd,), daemon=True).start()
        return self

    def _handle(self, signum, frame) -> None:
        """The Python-level handler: the watcher thread has counted this press already."""

    def _watch(self, read_fd: int) -> None:
        """Count the SIGINTs written to the wakeup pipe until its write end is closed."""
        with open(read_fd, "rb", buffering=0) as pipe:
            while data := pipe.read(64):
                for signum in data:
                    if signum == signal.SIGINT:
                        self._press()

    def _press(self) -> None:
        with self._lock:
            self._presses += 1
            presses = self._presses
        if presses == 1:
            self.requested = True
            tqdm.write("interrupt: saving a checkpoint after this step (Ctrl-C again to abort)")
            return
        print("interrupt: aborted; the last saved checkpoint is kept", file=sys.stderr, flush=True)
        os._exit(EXIT_INTERRUPTED)

    def __exit__(self, *exc) -> None:
        if self._pipe is None:
            return
        signal.set_wakeup_fd(self._previous_wakeup)
        signal.signal(signal.SIGINT, self._previous_handler)
        write_fd = self._pipe[1]
        self._pipe = None
        os.close(write_fd)  # the watcher reads end-of-file, closes the read end and returns
