"""Orbax training checkpoints: train state + input-pipeline position, async, keep-N, resume.

Each step directory holds two items: `state` (the TrainState, orbax StandardSave) and `meta`
(JSON: the data iterator's state, a checksum of every array of the train state and what wrote
it: model, dataset, optimizer). Orbax writes into a temporary directory and renames it when
finished, so a half-written save is never listed. On restore:

- a step whose arrays do not fit this run's train state (another model or optimizer) stops the
  run with `CheckpointMismatchError`, naming what differs;
- a step that fails to load or whose checksum differs is refused with a one-line warning and
  the previous step is tried; once one loads, the refused steps are moved aside
  (`<step>.corrupt`), so the run can save those steps again and finish.

Orbax's own log records are hidden (its errors too, while checkpoints are being read: each
problem is reported here, once); set `FLAX_ATTENTION_ORBAX_LOG=1` to see them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from flax_attention.training.state import TrainState

ORBAX_LOG_ENV = "FLAX_ATTENTION_ORBAX_LOG"


class CorruptCheckpointError(RuntimeError):
    """No checkpoint under the directory could be restored."""


class CheckpointMismatchError(ValueError):
    """A checkpoint holds another run's train state (another model or optimizer)."""


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
    """`ocp.CheckpointManager` over `directory` keeping the newest `max_to_keep` steps.

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
        _hide_orbax_info_logs()
        with _orbax_errors_hidden():  # it reads every step's metadata: we report problems
            self.manager = ocp.CheckpointManager(
                self.directory,
                options=ocp.CheckpointManagerOptions(
                    max_to_keep=max_to_keep, enable_async_checkpointing=async_save, create=True
                ),
                item_handlers={
                    "state": ocp.StandardCheckpointHandler(),
                    "meta": ocp.JsonCheckpointHandler(),
                },
            )

    def save(self, step: int, state: TrainState, data_state: dict) -> None:
        """Start saving `state` (canonical, finite) and the iterator state as step `step`."""
        meta = {
            "step": step,
            "data": data_state,
            "checksum": _checksum_list(state),
            "data_checksum": data_checksum(data_state),
            "run": self.run,
        }
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)
            ),
            force=True,
        )

    def latest_step(self) -> int | None:
        with _orbax_errors_hidden():  # reads step metadata: restore_latest reports problems
            return self.manager.latest_step()

    def restore_latest(self, abstract_state: TrainState) -> tuple[TrainState, dict, int] | None:
        """(state, data_state, step) of the newest readable checkpoint, or None if there is none.

        `abstract_state`: `jax.ShapeDtypeStruct`s with shardings, the target layout. Raises
        `CheckpointMismatchError` if a step holds a train state of another layout.
        Unreadable or corrupt steps are reported on stderr and skipped, and moved aside once an
        older step restores; if every step is unreadable, raises `CorruptCheckpointError` and
        moves nothing.
        """
        refused: list[int] = []
        with _orbax_errors_hidden():
            self.manager.reload()
            steps = sorted(self.manager.all_steps(), reverse=True)
            for step in steps:
                self._check_layout(step, abstract_state)
                try:
                    restored = self.manager.restore(
                        step,
                        args=ocp.args.Composite(
                            state=ocp.args.StandardRestore(abstract_state),
                            meta=ocp.args.JsonRestore(),
                        ),
                    )
                    state, meta = restored.state, restored.meta
                    if meta["checksum"] != _checksum_list(state):
                        raise ValueError("checksum of the restored arrays does not match")
                    _check_data_position(meta)
                except Exception as err:  # any failure to read means this step is unusable
                    print(
                        f"warning: refusing checkpoint {self.directory / str(step)}: it is "
                        f"corrupt or half-written ({type(err).__name__}: {_first_line(err)})",
                        file=sys.stderr,
                    )
                    refused.append(step)
                    continue
                self._move_aside(refused)
                return state, meta["data"], step
        if steps:
            raise CorruptCheckpointError(
                f"none of the checkpoints {steps} under {self.directory} could be restored; "
                "move the directory away to start from scratch"
            )
        return None

    def _check_layout(self, step: int, abstract_state: TrainState) -> None:
        """Raise `CheckpointMismatchError` if step `step`'s saved arrays (when its metadata can
        be read) differ in names, shapes or dtypes from `abstract_state`'s."""
        try:
            saved = _layout(self.manager.item_metadata(step)["state"])
        except Exception:  # unreadable metadata: the restore that follows reports it
            return
        if not saved:
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
            meta = self.manager.restore(
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

    def _move_aside(self, steps: list[int]) -> None:
        """Rename the refused step directories `<step>` to `<step>.corrupt` (process 0; all
        processes wait for it), so that those steps can be saved again."""
        if not steps:
            return
        if jax.process_index() == 0:
            for step in steps:
                source = self.directory / str(step)
                target = self.directory / f"{step}.corrupt"
                n = 1
                while target.exists():
                    n += 1
                    target = self.directory / f"{step}.corrupt{n}"
                source.rename(target)
                print(f"warning: moved the refused checkpoint aside to {target}", file=sys.stderr)
        ocp.multihost.sync_global_processes("flax_attention_move_aside_refused_checkpoints")
        self.manager.reload()

    def wait(self) -> None:
        """Block until pending asynchronous saves are on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


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


def _is_orbax(record: logging.LogRecord) -> bool:
    return f"{os.sep}orbax{os.sep}" in record.pathname


def _hide_orbax_info_logs() -> None:
    """Drop orbax's log records below ERROR (absl logging), unless $FLAX_ATTENTION_ORBAX_LOG."""
    absl = logging.getLogger("absl")
    if not os.environ.get(ORBAX_LOG_ENV) and _drop_orbax_info not in absl.filters:
        absl.addFilter(_drop_orbax_info)


def _drop_orbax_info(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.ERROR or not _is_orbax(record)


@contextlib.contextmanager
def _orbax_errors_hidden() -> Iterator[None]:
    """Drop orbax's error records while checkpoints are read (we report each refused step)."""
    absl = logging.getLogger("absl")
    drop = (lambda record: not _is_orbax(record)) if not os.environ.get(ORBAX_LOG_ENV) else None
    if drop is not None:
        absl.addFilter(drop)
    try:
        yield
    finally:
        if drop is not None:
            absl.removeFilter(drop)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:300] if text else ""
