"""Orbax training checkpoints: train state + input-pipeline position, async, keep-N, resume.

Each step directory holds two items: `state` (the TrainState, orbax StandardSave) and `meta`
(JSON: the data iterator's state, a checksum of every array of the train state and what wrote
it: model, dataset, optimizer). Orbax writes into a temporary directory and renames it when
finished, so a half-written save is never listed. On restore:

- a step whose arrays do not fit this run's train state (another model or optimizer), as any
  process sees it, stops the run with `CheckpointMismatchError`, naming what differs;
- a step written when the train state held a PRNG key (a `rng` leaf, which nothing read) is
  restored with that leaf in its target, then the leaf is dropped: its other arrays are
  checked and restored as any step's;
- a step that fails to load or whose checksum differs is refused and the previous step is
  tried. With several processes, every process tries each step and their verdicts are combined:
  the newest step that every process read wins, so all resume from the same step. Once one
  loads, process 0 alone moves the refused steps aside (`<step>.corrupt`, one warning line
  each), so the run can save those steps again and finish;
- a read that fails with an I/O error (an OSError other than a missing file, or a tensorstore
  status such as UNAVAILABLE) is retried a few times, never taken for corruption; if it keeps
  failing the run stops with `CheckpointReadError` and nothing is moved.

Steps are read by a manager of this process alone (no barrier a failure on one process could
leave the others waiting at); the verdicts are then exchanged with `process_allgather`.

At start the directory is checked to be writable (an `OSError` naming it, instead of a hang at
the first save) and temporary directories of interrupted saves (`*.orbax-checkpoint-tmp*`) are
removed. A full disk while saving raises `OSError(ENOSPC)` naming the directory.

Orbax's own log records are hidden (its errors too: each problem surfaces as an exception and
is reported once), and so are the "Event loop is closed" reports of its reads abandoned after
an error; set `FLAX_ATTENTION_ORBAX_LOG=1` to see them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import errno
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import struct
from jax.experimental import multihost_utils

from flax_attention.errors import DISK_FULL, NOT_WRITABLE, first_line
from flax_attention.training.state import TrainState

ORBAX_LOG_ENV = "FLAX_ATTENTION_ORBAX_LOG"
TMP_SUFFIX = ".orbax-checkpoint-tmp"  # orbax's suffix of a step directory being written
READ_ATTEMPTS = 3  # tries of a step whose read fails with an I/O error
RETRY_DELAY_S = 0.5  # before the second try; doubled before each further one
# tensorstore statuses (they begin its error messages) of storage that did not answer
TRANSIENT_STATUSES = ("UNAVAILABLE:", "DEADLINE_EXCEEDED:", "ABORTED:", "RESOURCE_EXHAUSTED:")
LEGACY_RNG = "rng"  # the train state's PRNG key leaf in checkpoints written while it had one


class CorruptCheckpointError(RuntimeError):
    """No checkpoint under the directory could be restored."""


class CheckpointMismatchError(ValueError):
    """A checkpoint holds another run's train state (another model or optimizer)."""


class CheckpointReadError(RuntimeError):
    """A checkpoint could not be read for a reason other than its content (an I/O error that
    retries did not cure); nothing was moved aside."""


class _Verdict(enum.IntEnum):
    """One process's verdict on a step; combined across processes by taking the largest."""

    USABLE = 0
    CORRUPT = 1  # missing or damaged content: refused, then moved aside
    UNREADABLE = 2  # I/O errors after retries: the run stops, nothing is moved
    MISMATCH = 3  # another run's train state: the run stops, nothing is moved


@jax.jit
def checksum(tree: Any) -> list[jax.Array]:
    """One uint32 per array of `tree`: the wrapping sum of its bits (as float32/uint32 words)."""

    def words(x):
        if x.dtype.itemsize != 4:
            x = x.astype(jnp.float32)
        return jnp.sum(jax.lax.bitcast_convert_type(x, jnp.uint32), dtype=jnp.uint32)

    return [words(x) for x in jax.tree.leaves(tree)]


def _checksum_list(state: TrainState) -> list[int]:
    return [int(v) for v in jax.device_get(checksum(state))]


def data_checksum(data_state: dict) -> int:
    """CRC-32 of the data position `data_state` (its JSON, keys sorted)."""
    return zlib.crc32(json.dumps(data_state, sort_keys=True).encode())


def _check_data_position(meta: dict) -> None:
    """Raise `ValueError` if `meta`'s data position does not match its checksum (checkpoints
    written before the data position had one are not checked)."""
    if "data_checksum" in meta and meta["data_checksum"] != data_checksum(meta["data"]):
        raise ValueError("checksum of the data position does not match")


class TrainCheckpointer:
    """`ocp.CheckpointManager` over `directory` keeping the newest `max_to_keep` steps; made
    after checking (on every process) that `directory` is writable and removing what saves
    that never finished left there.

    `run`: what writes the checkpoints (e.g. model, dataset, optimizer names), saved with each
    step and named when another run's checkpoint is found.
    """

    def __init__(
        self,
        directory: str | Path,
        *,
        max_to_keep: int = 3,
        async_save: bool = True,
        run: dict[str, Any] | None = None,
    ):
        self.directory = Path(directory).absolute()
        self.run = dict(run or {})
        _hide_orbax_logs()
        _check_writable(self.directory)
        if jax.process_index() == 0:
            _remove_unfinished_saves(self.directory)
        _sync("flax_attention_checkpoint_directory_ready")
        self.manager = _manager(
            self.directory,
            ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep, enable_async_checkpointing=async_save, create=True
            ),
        )
        self.reader = _manager(self.directory, _reader_options())

    def save(self, step: int, state: TrainState, data_state: dict) -> None:
        """Start saving `state` (canonical, finite) and the iterator state as step `step`."""
        meta = {
            "step": step,
            "data": data_state,
            "checksum": _checksum_list(state),
            "data_checksum": data_checksum(data_state),
            "run": self.run,
        }
        with _storage_errors_named(self.directory):
            self.manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
                ),
                force=True,
            )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def restore_latest(self, abstract_state: TrainState) -> tuple[TrainState, dict, int] | None:
        """(state, data_state, step) of the newest checkpoint every process can read, or None if
        there is none.

        `abstract_state`: `jax.ShapeDtypeStruct`s with shardings, the target layout. Raises
        `CheckpointMismatchError` if a step holds a train state of another layout, and
        `CheckpointReadError` if a step keeps failing with I/O errors. Steps that some process
        found corrupt are skipped, and moved aside by process 0 once an older step restores on
        every process; if no step is usable, raises `CorruptCheckpointError` and moves nothing.
        """
        refused: dict[int, str] = {}
        self.reader.reload()
        steps = _agreed_steps(self.reader.all_steps())
        for step in steps:
            restored, verdict, why = self._verdict_on(step, abstract_state)
            combined = _combined(verdict)
            if combined == _Verdict.MISMATCH:
                raise CheckpointMismatchError(
                    why
                    or f"{self.directory / str(step)} is a checkpoint of another run "
                    "(found by another process). Use another --workdir, or move "
                    f"{self.directory} away"
                )
            if combined == _Verdict.UNREADABLE:
                raise CheckpointReadError(
                    f"cannot read checkpoint {self.directory / str(step)}"
                    f"{f' ({why})' if why else ' on another process'}; nothing was moved "
                    "aside: check the storage and run again"
                )
            if combined == _Verdict.CORRUPT:
                refused[step] = why or "another process could not read it"
                if why and jax.process_index() != 0:  # process 0 reports what it moves
                    print(
                        f"warning: process {jax.process_index()} refuses checkpoint "
                        f"{self.directory / str(step)}: {why}",
                        file=sys.stderr,
                    )
                continue
            state, meta = restored
            self._move_aside(refused)
            return state, meta["data"], step
        if steps:
            raise CorruptCheckpointError(
                f"none of the checkpoints {steps} under {self.directory} could be restored; "
                "move the directory away to start from scratch"
            )
        return None

    def _verdict_on(
        self, step: int, abstract_state: TrainState
    ) -> tuple[tuple[TrainState, dict] | None, _Verdict, str]:
        """((state, meta) or None, this process's verdict on step `step`, why it is not usable:
        the mismatch message, or the read error)."""
        saved = self._saved_layout(step)
        legacy = saved is not None and LEGACY_RNG in saved
        target = _with_legacy_rng(abstract_state) if legacy else abstract_state
        try:
            self._check_layout(step, saved, target)
        except CheckpointMismatchError as err:
            return None, _Verdict.MISMATCH, str(err)
        restored, verdict, why = self._try_restore(step, target)
        if legacy and restored is not None:
            state, meta = restored
            restored = _without_legacy_rng(state), meta
        return restored, verdict, why

    def _try_restore(
        self, step: int, abstract_state: TrainState | _LegacyTrainState
    ) -> tuple[tuple[TrainState | _LegacyTrainState, dict] | None, _Verdict, str]:
        """((state, meta) or None, this process's verdict on step `step`, why it is not usable).
        A read failing with an I/O error is tried `READ_ATTEMPTS` times."""
        delay = RETRY_DELAY_S
        for attempt in range(1, READ_ATTEMPTS + 1):
            try:
                return self._restore_checked(step, abstract_state), _Verdict.USABLE, ""
            except Exception as err:  # any failure to read means this step is unusable
                why = f"{type(err).__name__}: {first_line(err)}"
                if not _is_io_error(err):
                    return None, _Verdict.CORRUPT, f"it is corrupt or half-written ({why})"
                if attempt == READ_ATTEMPTS:
                    return None, _Verdict.UNREADABLE, why
            time.sleep(delay)
            delay *= 2
        raise AssertionError("unreachable")

    def _restore_checked(
        self, step: int, abstract_state: TrainState | _LegacyTrainState
    ) -> tuple[TrainState | _LegacyTrainState, dict]:
        """(state, meta) of step `step`, read by this process alone (no barrier a failure could
        leave the others waiting at); ValueError if the arrays' or the data position's checksum
        differs."""
        restored = self.reader.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()
            ),
        )
        state, meta = restored.state, restored.meta
        if meta["checksum"] != _checksum_list(state):
            raise ValueError("checksum of the restored arrays does not match")
        _check_data_position(meta)
        return state, meta

    def _saved_layout(self, step: int) -> dict[str, tuple[tuple[int, ...], str]] | None:
        """The layout (see `_layout`) of step `step`'s saved train state; None if its metadata
        cannot be read or holds no arrays (the restore that follows reports what is wrong)."""
        try:
            return _layout(self.reader.item_metadata(step)["state"]) or None
        except Exception:  # unreadable metadata: the restore that follows reports it
            return None

    def _check_layout(
        self,
        step: int,
        saved: dict[str, tuple[tuple[int, ...], str]] | None,
        abstract_state: TrainState | _LegacyTrainState,
    ) -> None:
        """Raise `CheckpointMismatchError` if step `step`'s `saved` layout (None: not known)
        differs in names, shapes or dtypes from `abstract_state`'s."""
        if saved is None:
            return
        wanted = _layout(abstract_state)
        if saved == wanted:
            return
        differs = sorted(
            (k for k in saved.keys() | wanted.keys() if saved.get(k) != wanted.get(k)),
            key=lambda k: (k.startswith("opt_state"), k),  # model arrays first
        )
        parts = {key.split(".", 1)[0] for key in differs}
        what = "optimizer" if parts <= {"opt_state"} else "model"
        examples = "; ".join(
            f"{k}: saved {_describe(saved.get(k))}, this run {_describe(wanted.get(k))}"
            for k in differs[:3]
        )
        more = f" (and {len(differs) - 3} more)" if len(differs) > 3 else ""
        raise CheckpointMismatchError(
            f"{self.directory / str(step)} is a checkpoint of another {what}"
            f"{self._whose(step)}: {examples}{more}. Use another --workdir, or move "
            f"{self.directory} away"
        )

    def _whose(self, step: int) -> str:
        """' (model X; this run: model Y)': what differs between the run that wrote step `step`
        (where recorded) and this run; '' if that is not known."""
        try:
            meta = self.reader.restore(
                step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())
            ).meta
            saved = dict(meta.get("run") or {})
        except Exception:  # no readable record: the array layouts alone are reported
            return ""
        keys = [k for k in saved if k in self.run and saved[k] != self.run[k]]
        if not keys:
            return ""
        theirs = ", ".join(f"{k} {saved[k]}" for k in keys)
        mine = ", ".join(f"{k} {self.run[k]}" for k in keys)
        return f" ({theirs}; this run: {mine})"

    def _move_aside(self, refused: dict[int, str]) -> None:
        """Rename the refused step directories `<step>` to `<step>.corrupt` (process 0, one
        warning line each, saying why; all processes wait for it), so that those steps can be
        saved again."""
        if not refused:
            return
        if jax.process_index() == 0:
            for step, why in refused.items():
                source = self.directory / str(step)
                if not source.exists():  # listed by another process only
                    continue
                target = self.directory / f"{step}.corrupt"
                n = 1
                while target.exists():
                    n += 1
                    target = self.directory / f"{step}.corrupt{n}"
                source.rename(target)
                print(
                    f"warning: refusing checkpoint {source}: {why}; moved the refused checkpoint "
                    f"aside to {target}",
                    file=sys.stderr,
                )
        _sync("flax_attention_move_aside_refused_checkpoints")
        self.manager.reload()
        self.reader.reload()

    def wait(self) -> None:
        """Block until pending asynchronous saves are on disk."""
        with _storage_errors_named(self.directory):
            self.manager.wait_until_finished()

    def close(self) -> None:
        self.reader.close()
        self.manager.close()


@struct.dataclass
class _LegacyTrainState:
    """`TrainState` as checkpoints written while it held a PRNG key store it: the same fields
    in the same order (so the same leaf order, which the saved checksums follow), then `rng`."""

    params: Any
    batch_stats: Any
    opt_state: Any
    step: Any
    rng: Any


def _with_legacy_rng(abstract_state: TrainState) -> _LegacyTrainState:
    """The restore target of a checkpoint with the legacy `rng` leaf: `abstract_state` and a raw
    uint32 (2,) key placed as the step counter is."""
    step = abstract_state.step
    rng = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=getattr(step, "sharding", None))
    return _LegacyTrainState(**_fields(abstract_state), rng=rng)


def _without_legacy_rng(state: _LegacyTrainState) -> TrainState:
    """The `TrainState` of a restored legacy state: its `rng` dropped."""
    fields = _fields(state)
    del fields[LEGACY_RNG]
    return TrainState(**fields)


def _fields(state: Any) -> dict[str, Any]:
    """A dataclass's fields by name, not copied (unlike `dataclasses.asdict`)."""
    return {field.name: getattr(state, field.name) for field in dataclasses.fields(state)}


def abstract_like(state: TrainState) -> TrainState:
    """`jax.ShapeDtypeStruct`s (with shardings) of `state`: a restore target."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, state)


def is_finite(tree: Any) -> bool:
    """Whether every floating-point array of `tree` is finite (no NaN/inf)."""
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
    return bool(_all_finite(leaves))


@jax.jit
def _all_finite(leaves: list[jax.Array]) -> jax.Array:
    return jnp.all(jnp.asarray([jnp.all(jnp.isfinite(x)) for x in leaves]))


def _layout(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
    """{"params.stem.kernel": (shape, dtype name), ...} of a tree of arrays or array metadata."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        names = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
        if names[-1] == "value":  # nnx.State leaves: params.fc.kernel.value
            names.pop()
        out[".".join(names)] = (tuple(leaf.shape), str(jnp.dtype(leaf.dtype)))
    return out


def _describe(entry: tuple[tuple[int, ...], str] | None) -> str:
    return "none" if entry is None else f"{entry[1]}{list(entry[0])}"


def _manager(directory: Path, options: ocp.CheckpointManagerOptions) -> ocp.CheckpointManager:
    """An orbax manager of `directory`'s steps: the train state and the JSON metadata."""
    return ocp.CheckpointManager(
        directory,
        options=options,
        item_handlers={
            "state": ocp.StandardCheckpointHandler(),
            "meta": ocp.JsonCheckpointHandler(),
        },
    )


def _reader_options() -> ocp.CheckpointManagerOptions:
    """Options of a manager that only reads, in this process alone: its reads wait for no other
    process, so a step that fails on one process only cannot leave the others at a barrier."""
    pid = jax.process_index()
    return ocp.CheckpointManagerOptions(
        read_only=True,
        multiprocessing_options=ocp.options.MultiprocessingOptions(
            primary_host=pid,
            active_processes={pid},
            barrier_sync_key_prefix=f"flax_attention_reader_{pid}",
        ),
    )


def _sync(name: str) -> None:
    """Wait until every process gets here (nothing with one process)."""
    if jax.process_count() > 1:
        ocp.multihost.sync_global_processes(name)


def _allgather(values: np.ndarray) -> np.ndarray:
    """`values` of every process, stacked on a first axis (one row with one process)."""
    if jax.process_count() == 1:
        return values[None]
    return np.asarray(multihost_utils.process_allgather(values))


def _combined(verdict: _Verdict) -> _Verdict:
    """The worst of every process's verdict on one step."""
    return _Verdict(int(_allgather(np.asarray([int(verdict)], np.int32)).max()))


def _agreed_steps(local: list[int]) -> list[int]:
    """Every step any process lists, newest first: all processes then try the same steps (a
    step that a process does not list, it finds corrupt)."""
    counts = _allgather(np.asarray([len(local)], np.int32))
    padded = np.full(int(counts.max()), -1, np.int64)
    padded[: len(local)] = local
    every = _allgather(padded)
    return sorted({int(step) for step in every.reshape(-1) if step >= 0}, reverse=True)


def _is_io_error(err: BaseException) -> bool:
    """Whether `err` (or what caused it) is an I/O failure rather than damaged content: an
    OSError other than a missing file, or a tensorstore status that says the storage did not
    answer (UNAVAILABLE, DEADLINE_EXCEEDED, ...). Such a read may succeed when tried again."""
    for cause in _causes(err):
        if isinstance(cause, OSError) and not isinstance(
            cause, FileNotFoundError | NotADirectoryError | IsADirectoryError
        ):
            return True
        if str(cause).startswith(TRANSIENT_STATUSES):
            return True
    return False


def _causes(err: BaseException) -> Iterator[BaseException]:
    """`err`, then what it was raised from or while handling, transitively."""
    seen: set[int] = set()
    todo = [err]
    while todo:
        current = todo.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        todo += [current.__cause__, current.__context__]
        todo += list(getattr(current, "exceptions", ()))


@contextlib.contextmanager
def _storage_errors_named(directory: Path) -> Iterator[None]:
    """A full disk or a read-only directory found while saving under `directory` surfaces as
    an `OSError` with that errno naming the directory (however orbax wrapped it)."""
    try:
        yield
    except Exception as err:
        for cause in _causes(err):
            if isinstance(cause, OSError) and cause.errno in DISK_FULL | NOT_WRITABLE:
                path = cause.filename or directory
                raise OSError(cause.errno, os.strerror(cause.errno), str(path)) from err
        if "No space left on device" in str(err):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory)) from err
        raise


def _check_writable(directory: Path) -> None:
    """Create `directory` if needed and write a file in it, on every process; the OSError
    (naming the path) on each process if that fails on any, before any training step."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory, prefix=".write-test-"):
            pass
        problem = None
    except OSError as err:  # named by the directory, not by the test file
        problem = OSError(err.errno, err.strerror, str(directory))
    failed = _allgather(np.asarray([problem is not None], np.int32))
    if problem is not None:
        raise problem
    if failed.any():
        raise OSError(errno.EACCES, "not writable from another process", str(directory))


def _remove_unfinished_saves(directory: Path) -> None:
    """Delete the temporary directories of saves that never finished (killed, disk full):
    orbax's `<step>.orbax-checkpoint-tmp*`."""
    for path in directory.glob(f"*{TMP_SUFFIX}*"):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def _hide_orbax_logs() -> None:
    """Drop orbax's log records (absl logging; its errors surface as exceptions, reported here
    once) and the reports of its abandoned reads, unless $FLAX_ATTENTION_ORBAX_LOG."""
    if os.environ.get(ORBAX_LOG_ENV):
        return
    absl = logging.getLogger("absl")
    if _not_orbax not in absl.filters:
        absl.addFilter(_not_orbax)
    if not isinstance(sys.unraisablehook, _DropClosedLoopReports):
        sys.unraisablehook = _DropClosedLoopReports(sys.unraisablehook)


class _DropClosedLoopReports:
    """An `sys.unraisablehook` that drops "Event loop is closed" RuntimeErrors (tensorstore
    completing a read that orbax abandoned after an error, one per array) and passes every
    other report to the hook it wraps."""

    def __init__(self, wrapped: Any):
        self.wrapped = wrapped

    def __call__(self, report: Any) -> None:
        value = report.exc_value
        if isinstance(value, RuntimeError) and str(value) == "Event loop is closed":
            return
        self.wrapped(report)


def _not_orbax(record: logging.LogRecord) -> bool:
    return f"{os.sep}orbax{os.sep}" not in record.pathname
