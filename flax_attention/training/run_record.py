"""The run record: the training config that determines a run's trajectory, kept in its workdir
and compared when the run resumes.

`<workdir>/run_config.json` holds the `TrainConfig` values that decide what is computed:
`TRAJECTORY_FIELDS` (model and model_kwargs, dataset and input resolution, batch size, seed,
optimizer and its hyperparameters, learning-rate schedule, run length in steps, precision,
BatchNorm grouping, label smoothing). The settings left out change how a run is carried out,
not what it computes (workdir, data_dir, intervals, workers, decoder, parallel form, progress),
and may differ on every resume.

A resume is refused with `ResumeMismatchError` when a recorded value differs, except the run's
length (`steps`, also when given as epochs), which may grow. A schedule whose values depend on
the run's length (cosine) is then stretched over the new length: the steps still to come follow
it, so the result is neither the shorter run nor a fresh run of the new length; `check_resume`
returns a note saying so.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from flax_attention.training.config import ConfigError, TrainConfig
from flax_attention.training.metrics import replace_atomically
from flax_attention.training.optim import make_schedule

RECORD_NAME = "run_config.json"

TRAJECTORY_FIELDS = (
    "model",
    "model_kwargs",
    "dataset",
    "image_size",
    "batch_size",
    "seed",
    "optimizer",
    "lr",
    "schedule",
    "warmup_steps",
    "weight_decay",
    "momentum",
    "nesterov",
    "label_smoothing",
    "precision",
    "bn_group_size",
    "steps",
)


class ResumeMismatchError(ConfigError):
    """A resume whose trajectory-determining config differs from the one recorded; one line."""


def trajectory_record(config: TrainConfig, image_size: int) -> dict[str, Any]:
    """The `TRAJECTORY_FIELDS` of `config` (its intervals in steps: `TrainConfig.in_steps`),
    as JSON would give them back; `image_size`: the resolution the run uses."""
    record = {name: getattr(config, name) for name in TRAJECTORY_FIELDS}
    record["image_size"] = image_size
    return json.loads(json.dumps(record))


def record_path(workdir: Path) -> Path:
    return Path(workdir) / RECORD_NAME


def read_record(workdir: Path) -> dict[str, Any] | None:
    """The record in `workdir`, or None if there is none; `ConfigError` if it is unreadable."""
    path = record_path(workdir)
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(
            f"cannot read the run record {path} ({type(err).__name__}): resume cannot be "
            "checked; restore the file or choose another --workdir"
        ) from None
    if not isinstance(record, dict):
        raise ConfigError(f"the run record {path} is not a JSON object; choose another --workdir")
    return record


def write_record(workdir: Path, record: dict[str, Any]) -> None:
    """Write `record` to `workdir`'s run record atomically (a temporary file renamed over it)."""

    def write(temporary: Path) -> None:
        with open(temporary, "w") as file:
            json.dump(record, file, indent=1, sort_keys=True)
            file.write("\n")
            file.flush()
            os.fsync(file.fileno())

    replace_atomically(record_path(workdir), write)


def check_resume(workdir: Path, record: dict[str, Any], step: int) -> list[str]:
    """Compare this run's `record` with the one in `workdir`, whose newest checkpoint is at
    `step`. Raises `ResumeMismatchError` listing every differing key (old -> new); returns notes
    for the user: a workdir without a record, a longer run whose schedule changes."""
    recorded = read_record(workdir)
    if recorded is None:
        return [
            f"note: {workdir} has no {RECORD_NAME} (a run from before it was kept): this "
            "resume cannot be compared with the run's config; it is recorded from now on"
        ]
    changes = [
        f"{key} {_show(recorded.get(key))} -> {_show(record[key])}"
        for key in record
        if key != "steps" and recorded.get(key) != record[key]
    ]
    old_steps, new_steps = recorded.get("steps"), record["steps"]
    if not isinstance(old_steps, int) or new_steps < old_steps:
        changes.append(f"steps {_show(old_steps)} -> {new_steps} (a run may grow, not shrink)")
    if changes:
        raise ResumeMismatchError(
            f"{workdir} holds a run with another training config: {'; '.join(changes)}. "
            f"Resume with the values in {record_path(workdir)}, or choose another --workdir"
        )
    if new_steps == old_steps:
        return []
    return _schedule_note(record, old_steps, step)


def _schedule_note(record: dict[str, Any], old_steps: int, step: int) -> list[str]:
    """A note when growing the run from `old_steps` changes the learning rate at `step`."""

    def lr_at(total: int) -> float:
        schedule = make_schedule(
            record["schedule"],
            lr=record["lr"],
            warmup_steps=record["warmup_steps"],
            total_steps=total,
        )
        return float(schedule(step))

    before, after = lr_at(old_steps), lr_at(record["steps"])
    if before == after:
        return []
    return [
        f"note: steps grow from {old_steps} to {record['steps']}: the {record['schedule']} "
        f"schedule is stretched over {record['steps']} steps, its learning rate at step {step} "
        f"becomes {after:.4g} (was {before:.4g}); the result is neither the {old_steps}-step run "
        f"nor a fresh {record['steps']}-step one"
    ]


def _show(value: Any) -> str:
    return json.dumps(value) if isinstance(value, dict | list) else str(value)
