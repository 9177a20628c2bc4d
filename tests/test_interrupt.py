"""Ctrl-C during training: the first asks for a stop, a second ends the process at once."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time

CHILD = textwrap.dedent(
    """
    import hashlib, sys
    from flax_attention.training.interrupt import StopOnInterrupt

    with StopOnInterrupt() as interrupt:
        print("ready", flush=True)
        # A long native call that holds the main thread, as an XLA compile does.
        hashlib.pbkdf2_hmac("sha256", b"x", b"y", {iterations})
        print("requested" if interrupt.requested else "not requested", flush=True)
    """
)


def _start(iterations: int) -> subprocess.Popen:
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD.format(iterations=iterations)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert child.stdout.readline().strip() == "ready"
    return child


def test_a_second_ctrl_c_aborts_at_once_during_a_long_native_call():
    child = _start(iterations=10**9)  # minutes of work in one call
    try:
        child.send_signal(signal.SIGINT)
        time.sleep(0.5)
        child.send_signal(signal.SIGINT)
        start = time.monotonic()
        _, err = child.communicate(timeout=20)
    finally:
        child.kill()
    assert time.monotonic() - start < 10
    assert child.returncode == 130
    assert "aborted" in err and "Traceback" not in err


def test_a_first_ctrl_c_during_a_native_call_is_a_stop_request():
    child = _start(iterations=2 * 10**6)
    try:
        child.send_signal(signal.SIGINT)
        out, err = child.communicate(timeout=60)
    finally:
        child.kill()
    assert child.returncode == 0, err
    assert out.strip().splitlines()[-1] == "requested"
    assert "saving a checkpoint after this step" in out + err


def test_the_handlers_are_restored_on_exit():
    from flax_attention.training.interrupt import StopOnInterrupt

    before = signal.getsignal(signal.SIGINT)
    with StopOnInterrupt():
        assert signal.getsignal(signal.SIGINT) is not before
    assert signal.getsignal(signal.SIGINT) is before
    assert signal.set_wakeup_fd(-1) == -1  # no wakeup descriptor left behind
