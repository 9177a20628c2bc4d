"""The training configuration: one flat dataclass, filled from defaults, a config file, flags.

`TrainConfig` is the single source of truth: the program's flags, their help, defaults and
choices, the flag table of docs/training.md and every check below are derived from its fields.
A config is validated when it is built (and again by `fit`), before any data or model is
touched: a bad value raises `ConfigError`, one line naming the field.

Intervals (`log_every`, `eval_every`, `checkpoint_every`) count optimizer steps (`100`) or
epochs (`"2ep"`, `"0.5ep"`); `in_steps()` turns them into steps once the epoch length is known.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax.numpy as jnp

from flax_attention import data
from flax_attention.errors import ConfigError
from flax_attention.models import MODELS
from flax_attention.training.optim import OPTIMIZERS, SCHEDULES
from flax_attention.training.parallel import PARALLEL
from flax_attention.training.steps import GRAD_SYNCS

PRECISIONS: dict[str, Any] = {"fp32": jnp.float32, "bf16": jnp.bfloat16}

_EPOCHS = re.compile(r"(\d+(?:\.\d*)?|\.\d+)ep")


def _names(registry: Any, *, sort: bool = True) -> Callable[[], list[str]]:
    """The names registered in `registry` (a mapping or a sequence), read when asked."""
    return lambda: sorted(registry) if sort else list(registry)


def _at_least(bound: float) -> Callable[[Any], str | None]:
    return lambda value: None if math.isfinite(value) and value >= bound else f"must be >= {bound}"


def _positive(value: float) -> str | None:
    return None if math.isfinite(value) and value > 0 else "must be a finite number > 0"


def _fraction(value: float) -> str | None:
    return None if 0 <= value < 1 else "must be in [0, 1)"


def _open_unit_interval(value: float) -> str | None:
    return None if 0 < value < 1 else "must be in (0, 1)"


def _workers(value: int) -> str | None:
    from flax_attention.data.limits import workers_problem

    return workers_problem(value)


def _image_side(value: int) -> str | None:
    from flax_attention.data.limits import image_side_problem

    return image_side_problem(value)


def _check_batches_fit(config: TrainConfig) -> None:
    """The training and evaluation batches fit this machine's memory at the run's image size
    (the dataset's when `image_size` is not set); `ConfigError` naming the field otherwise."""
    from flax_attention.data.limits import batch_problem
    from flax_attention.data.registry import DATASETS

    spec = DATASETS[config.dataset]
    side = config.image_size or spec.image_size
    for name in ("batch_size", "eval_batch_size"):
        batch = getattr(config, name)
        problem = batch and batch_problem(batch, side, spec.channels)
        if problem:
            raise ConfigError(f"{name}: {problem}")


def _interval(minimum: int) -> Callable[[int | str], str | None]:
    def check(value: int | str) -> str | None:
        if isinstance(value, str):
            match = _EPOCHS.fullmatch(value.strip())
            if match is None:
                return "must be a number of steps (100) or of epochs ('2ep')"
            return None if float(match[1]) > 0 else "must be more than 0 epochs"
        return None if value >= minimum else f"must be >= {minimum} steps (or epochs: '2ep')"

    return check


def _field(
    default: Any,
    *,
    help: str,
    choices: Callable[[], Sequence[str]] | None = None,
    check: Callable[[Any], str | None] | None = None,
) -> Any:
    """A dataclass field whose metadata holds its help text, its choices (a function, so that
    registries are read when the config is checked) and its range check."""
    return dataclasses.field(
        default=default, metadata={"help": help, "choices": choices, "check": check}
    )


@dataclasses.dataclass
class TrainConfig:
    """Every setting of a training run; see each field's help (`flax-attention train --help`)."""

    model: str = _field(
        "se_resnet18",
        help="registered model (flax-attention list)",
        choices=_names(MODELS),
    )
    pretrained: str | None = _field(
        None,
        help="start from these weights (fine-tuning): a saved model directory, a PyTorch weights "
        "file, hf-hub:ORG/REPO[/FILE] or default (the model's default Hub weights); a classifier "
        "of another class count starts from scratch; a resumed run continues from its checkpoints",
        check=lambda value: None if value.strip() else "must not be empty",
    )
    dataset: str = _field(
        "digits",
        help="dataset (digits: embedded, no download)",
        choices=_names(data.DATASETS),
    )
    data_dir: str | None = _field(
        None,
        help="tfds data_dir with the prepared dataset (default: $FLAX_ATTENTION_DATA_DIR or "
        "~/.cache/flax_attention/tfds)",
    )
    workdir: str = _field(
        "runs/default",
        help="where checkpoints/, metrics.jsonl, metrics.png and model/ go",
        check=lambda value: None if value.strip() else "must not be empty",
    )
    steps: int | None = _field(
        None, help="length of the run in optimizer steps (wins over epochs)", check=_at_least(1)
    )
    epochs: float = _field(
        1.0, help="length of the run in passes over the training split", check=_positive
    )
    batch_size: int = _field(
        64, help="global batch size (over all devices and hosts)", check=_at_least(1)
    )
    eval_batch_size: int | None = _field(
        None, help="global evaluation batch size (default: batch_size)", check=_at_least(1)
    )
    image_size: int | None = _field(
        None, help="input resolution (default: the dataset's)", check=_image_side
    )
    lr: float = _field(0.1, help="peak learning rate, reached after the warm-up", check=_positive)
    optimizer: str = _field(
        "sgd",
        help="optimizer; weight decay applies to conv/linear kernels only",
        choices=_names(OPTIMIZERS),
    )
    schedule: str = _field(
        "cosine",
        help="learning-rate schedule, after a linear warm-up from 0",
        choices=_names(SCHEDULES),
    )
    warmup_steps: int = _field(0, help="linear warm-up steps", check=_at_least(0))
    weight_decay: float = _field(
        5e-4, help="weight decay (never on BatchNorm or biases)", check=_at_least(0)
    )
    momentum: float = _field(0.9, help="SGD/LARS momentum, AdamW beta1", check=_fraction)
    nesterov: bool = _field(True, help="Nesterov momentum (SGD/LARS)")
    label_smoothing: float = _field(
        0.0, help="label smoothing of the cross-entropy", check=_fraction
    )
    parallel: str = _field(
        "jit",
        help="jit: one jax.jit step over a mesh of all devices (batch sharded, shard_map body, "
        "global BatchNorm statistics); pmap: jax.pmap with cross-replica BatchNorm; none: one "
        "device",
        choices=_names(PARALLEL),
    )
    grad_sync: str = _field(
        "flat",
        help="gradient all-reduce: flat (one all-reduce of all gradients concatenated, after the "
        "backward), end (a pmean of the gradient tree after the backward) or backward (each "
        "parameter's as the backward produces it)",
        choices=_names(GRAD_SYNCS, sort=False),
    )
    bn_group_size: int = _field(
        0,
        help="BatchNorm statistics over groups of N consecutive devices (must divide the device "
        "count; --parallel jit); 0: all devices",
        check=_at_least(0),
    )
    precision: str = _field(
        "fp32",
        help="bf16: bfloat16 compute, float32 parameters, optimizer state and BatchNorm statistics",
        choices=_names(PRECISIONS, sort=False),
    )
    seed: int = _field(0, help="seed of the initialisation and the data order", check=_at_least(0))
    resume: bool = _field(
        True,
        help="resume from the newest checkpoint in workdir (no: refuse a workdir with checkpoints)",
    )
    log_every: int | str = _field(
        10, help="steps (or epochs: 0.5ep) between metrics.jsonl records", check=_interval(1)
    )
    eval_every: int | str = _field(
        0,
        help="steps (or epochs: 2ep) between evaluations; 0: only the final one",
        check=_interval(0),
    )
    checkpoint_every: int | str = _field(
        500, help="steps (or epochs: 1ep) between checkpoints", check=_interval(1)
    )
    keep_checkpoints: int = _field(3, help="how many checkpoints to keep", check=_at_least(1))
    num_workers: int = _field(
        0, help="data loading worker processes (0: threads in this process)", check=_workers
    )
    decoder: str = _field(
        "auto",
        help="JPEG decoding: cpu, gpu (nvImageCodec), hybrid (part of every batch on the CPU "
        "workers, the rest on the GPU) or auto (gpu when available)",
        choices=_names(data.DECODERS, sort=False),
    )
    decode_threads: int = _field(
        3,
        help="GPU decoding: batches decoded at once, each on a thread with its own CUDA stream",
        check=_at_least(1),
    )
    hybrid_cpu_share: float = _field(
        0.375,
        help="--decoder hybrid: the share of every batch's rows decoded on the CPU (by the "
        "--num-workers processes; with 0, in this process beside the GPU decoder)",
        check=_open_unit_interval,
    )
    distributed: bool = _field(
        False, help="call jax.distributed.initialize() (multi-host: one process per host)"
    )
    progress: bool = _field(True, help="show progress bars")
    model_kwargs: dict[str, Any] = dataclasses.field(
        default_factory=dict, metadata={"help": "extra create_model keyword arguments"}
    )

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check every field's type, range and choice, and that `workdir` can be created;
        raises `ConfigError` naming the first bad field. Reads no data and builds no model."""
        for name in _HINTS:
            setattr(self, name, check_value(name, getattr(self, name)))
        _check_model_fits_dataset(self.model_kwargs, self.dataset)
        _check_batches_fit(self)
        _check_workdir(Path(self.workdir))

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TrainConfig:
        """A validated config from `values`; unknown keys raise a `ConfigError` naming them."""
        return cls(**check_values(values))

    def in_steps(self, steps_per_epoch: int) -> TrainConfig:
        """This config with `steps` set and every interval in steps (an epoch: `steps_per_epoch`).
        An interval of epochs is rounded to the nearest step, at least 1."""

        def steps(value: int | str) -> int:
            if isinstance(value, int):
                return value
            epochs = float(_EPOCHS.fullmatch(value.strip())[1])
            return max(round(epochs * steps_per_epoch), 1)

        total = self.steps if self.steps is not None else round(self.epochs * steps_per_epoch)
        total = max(total, 1)
        return dataclasses.replace(
            self,
            steps=total,
            log_every=steps(self.log_every),
            eval_every=steps(self.eval_every),
            checkpoint_every=steps(self.checkpoint_every),
        )


_FIELDS: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(TrainConfig)}
_HINTS: dict[str, Any] = typing.get_type_hints(TrainConfig)


def field_help(field: dataclasses.Field) -> tuple[str, list[str] | None]:
    """(help text, choices or None) of one `TrainConfig` field."""
    choices = field.metadata.get("choices")
    return field.metadata["help"], (list(choices()) if choices else None)


def check_values(values: Mapping[str, Any]) -> dict[str, Any]:
    """`values` with each entry type- and range-checked (and ints widened to floats where a
    float goes); `ConfigError` naming the first unknown key or bad value. No file system checks."""
    if not isinstance(values, Mapping):
        raise ConfigError(f"expected a mapping of config keys, got {type(values).__name__}")
    unknown = sorted(str(key) for key in values if key not in _FIELDS)
    if unknown:
        raise ConfigError(f"unknown config keys {unknown}; known keys: {sorted(_FIELDS)}")
    return {key: check_value(key, value) for key, value in values.items()}


_TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def check_value(name: str, value: Any) -> Any:
    """`value` of field `name` if it has the field's type, range and choice (an int is widened
    to float for a float field); else `ConfigError`."""
    field, hint = _FIELDS[name], _HINTS[name]
    kinds = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if value is None:
        if type(None) in kinds:
            return None
        raise ConfigError(f"{name} must not be empty (null)")
    value = _typed(name, value, [k for k in kinds if k is not type(None)])
    choices = field.metadata.get("choices")
    if choices is not None and value not in choices():
        raise ConfigError(f"{name}: unknown value {value!r}; choose one of {list(choices())}")
    check = field.metadata.get("check")
    problem = check(value) if check is not None else None
    if problem:
        raise ConfigError(f"{name} {problem} (got {value!r})")
    return value


def _typed(name: str, value: Any, kinds: list[Any]) -> Any:
    is_number = isinstance(value, int | float) and not isinstance(value, bool)
    for kind in kinds:
        if kind is float and is_number:
            return float(value)
        if kind is int and is_number and isinstance(value, int):
            return value
        if kind in (bool, str) and isinstance(value, kind):
            return value
        is_mapping = typing.get_origin(kind) is dict and isinstance(value, dict)
        if is_mapping and all(isinstance(key, str) for key in value):
            return value
    wanted = " or ".join(_TYPE_NAMES.get(k, "a mapping") for k in kinds)
    raise ConfigError(f"{name} must be {wanted}, got {value!r} ({type(value).__name__})")


def _check_model_fits_dataset(model_kwargs: Mapping[str, Any], dataset: str) -> None:
    """`model_kwargs`' `num_classes` and `in_channels`, where given, are the dataset's (a
    model with another head trains, then cannot be evaluated on it); else `ConfigError`."""
    if not model_kwargs.keys() & {"num_classes", "in_channels"}:
        return
    spec = data.DATASETS[dataset]  # a registry entry, no data read
    wanted = {
        "num_classes": (spec.num_classes, "classes"),
        "in_channels": (spec.channels, "channels"),
    }
    for name, (count, what) in wanted.items():
        if name in model_kwargs and model_kwargs[name] != count:
            raise ConfigError(
                f"model_kwargs: {name} {model_kwargs[name]!r} disagrees with dataset {dataset}, "
                f"which has {count} {what}; remove it or set {count}"
            )


def _check_workdir(workdir: Path) -> None:
    """`workdir` is a directory or can be created: its nearest existing ancestor is a writable
    directory. Creates nothing."""
    path = workdir.absolute()
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        where = "is a file" if existing == path else f"is under a file ({existing})"
        raise ConfigError(f"workdir {workdir} {where}; choose a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(
            f"workdir {workdir} cannot be created or written ({existing} is read-only)"
        )
