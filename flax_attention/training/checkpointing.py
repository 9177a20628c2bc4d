"""Orbax training checkpoints: train state + input-pipeline position, async, keep-N, resume.

Each step directory holds two items: `state` (the TrainState, orbax StandardSave) and `meta`
(JSON: the data iterator's state and a checksum of every array of the train state). Orbax
writes into a temporary directory and renames it when finished, so a half-written save is never
listed. On restore the checksum is recomputed; a step that fails to load or whose checksum
differs is refused with a message and the previous step is tried.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from flax_attention.training.state import TrainState


class CorruptCheckpointError(RuntimeError):
    """No checkpoint under the directory could be restored."""


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


class TrainCheckpointer:
    """`ocp.CheckpointManager` over `directory` keeping the newest `max_to_keep` steps."""

    def __init__(self, directory: str | Path, *, max_to_keep: int = 3, async_save: bool = True):
        self.directory = Path(directory).absolute()
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep, enable_async_checkpointing=async_save, create=True
            ),
            item_names=("state", "meta"),
        )

    def save(self, step: int, state: TrainState, data_state: dict) -> None:
        """Start saving `state` (canonical, finite) and the iterator state as step `step`."""
        meta = {"step": step, "data": data_state, "checksum": _checksum_list(state)}
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
        """(state, data_state, step) of the newest readable checkpoint, or None if there is none.

        `abstract_state`: `jax.ShapeDtypeStruct`s with shardings, the target layout. Unreadable
        or corrupt steps are reported on stderr and skipped; if every step is, raises
        `CorruptCheckpointError`.
        """
        self.manager.reload()
        steps = sorted(self.manager.all_steps(), reverse=True)
        for step in steps:
            try:
                restored = self.manager.restore(
                    step,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()
                    ),
                )
                state, meta = restored.state, restored.meta
                if meta["checksum"] != _checksum_list(state):
                    raise ValueError("checksum of the restored arrays does not match the saved one")
            except Exception as err:  # any failure to read means this step is unusable
                print(
                    f"warning: refusing checkpoint {self.directory / str(step)}: it is corrupt or "
                    f"half-written ({type(err).__name__}: {_first_line(err)}); "
                    "trying the previous one",
                    file=sys.stderr,
                )
                continue
            return state, meta["data"], step
        if steps:
            raise CorruptCheckpointError(
                f"none of the checkpoints {steps} under {self.directory} could be restored; "
                "move the directory away to start from scratch"
            )
        return None

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


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:300] if text else ""
