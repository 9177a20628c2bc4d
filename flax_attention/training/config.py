"""The training configuration: one flat dataclass, filled from defaults, a config file, flags."""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass
class TrainConfig:
    """Every setting of a training run. `batch_size` is global (over all processes/devices);
    `steps` wins over `epochs` when both are set; `lr` is the peak of the schedule."""

    model: str = "se_resnet18"
    dataset: str = "digits"
    data_dir: str | None = None
    workdir: str = "runs/default"
    steps: int | None = None
    epochs: float = 1.0
    batch_size: int = 64
    eval_batch_size: int | None = None
    image_size: int | None = None
    lr: float = 0.1
    optimizer: str = "sgd"
    schedule: str = "cosine"
    warmup_steps: int = 0
    weight_decay: float = 5e-4
    momentum: float = 0.9
    nesterov: bool = True
    label_smoothing: float = 0.0
    parallel: str = "jit"
    precision: str = "fp32"
    seed: int = 0
    resume: bool = True
    log_every: int = 10
    eval_every: int = 0
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    num_workers: int = 0
    decoder: str = "auto"
    distributed: bool = False
    progress: bool = True
    model_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """A config from `values`; unknown keys raise a ValueError naming them."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown config keys {unknown}; known keys: {sorted(names)}")
        return cls(**values)
