"""Exit statuses and one-line messages shared by the command-line programs.

- 0: success.
- 1: the run failed: a check of the data failed, training diverged, no checkpoint could be
  read, the disk is full (an environment problem), or a bug (its traceback is printed first).
- 2: usage error, something the user can fix: a bad flag or config value, a missing or
  corrupt input file, a read-only directory, a checkpoint of another run.
- 130: interrupted (Ctrl-C).
"""

from __future__ import annotations

import errno
import sys
import traceback

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

NOT_WRITABLE = frozenset({errno.EACCES, errno.EPERM, errno.EROFS})
DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})


def os_error_exit(err: OSError) -> tuple[int, str] | None:
    """(exit status, one-line message) for an OSError the user or the machine must fix: a
    read-only or forbidden path (2), a full disk (1); None for any other OSError."""
    path = err.filename if err.filename is not None else "a file"
    reason = err.strerror or str(err)
    if err.errno in NOT_WRITABLE:
        return EXIT_USAGE, (
            f"cannot use {path}: {reason}; fix its permissions or choose another directory"
        )
    if err.errno in DISK_FULL:
        return EXIT_FAILED, (
            f"cannot write {path}: {reason}; free some space (or choose another --workdir) "
            "and run again"
        )
    return None


def report_bug(err: BaseException) -> int:
    """Print `err`'s traceback, then one `error: ...` line saying it is a bug; returns 1."""
    traceback.print_exception(err, file=sys.stderr)
    print(
        f"error: internal error ({type(err).__name__}: {first_line(err)}); this is a bug, "
        "please report it with the traceback above",
        file=sys.stderr,
    )
    return EXIT_FAILED


def first_line(err: BaseException, limit: int = 300) -> str:
    """The first line of `err`'s message, at most `limit` characters."""
    text = str(err).strip()
    return text.splitlines()[0][:limit] if text else ""


class DataFileError(Exception):
    """A dataset file that cannot be read (corrupt or truncated); one line naming it."""


class RunFileError(Exception):
    """A file of a run's workdir that cannot be read as ours (e.g. a metrics.jsonl line that is
    no record); one line naming it and what to do."""


class ConfigError(ValueError):
    """A training configuration value (or config file) that cannot be used; one line."""
