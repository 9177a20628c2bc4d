"""Training: train state, optimizers, step functions and their parallel forms (jit / pmap / one
device), orbax checkpoints and the fit loop used by the `flax-attention train` program."""

from flax_attention.training.checkpointing import (
    CheckpointMismatchError,
    CorruptCheckpointError,
    TrainCheckpointer,
)
from flax_attention.training.config import PRECISIONS, ConfigError, TrainConfig
from flax_attention.training.evaluate import evaluate
from flax_attention.training.loop import (
    TrainingDivergedError,
    TrainingInterruptedError,
    build_model,
    fit,
)
from flax_attention.training.loss import cross_entropy, top_k_correct
from flax_attention.training.optim import (
    OPTIMIZERS,
    SCHEDULES,
    decay_mask,
    make_optimizer,
    make_schedule,
)
from flax_attention.training.parallel import PARALLEL, make_parallel
from flax_attention.training.state import TrainState, create_train_state, merge_model
from flax_attention.training.steps import eval_step, train_step

__all__ = [
    "OPTIMIZERS",
    "PARALLEL",
    "PRECISIONS",
    "SCHEDULES",
    "CheckpointMismatchError",
    "ConfigError",
    "CorruptCheckpointError",
    "TrainCheckpointer",
    "TrainConfig",
    "TrainState",
    "TrainingDivergedError",
    "TrainingInterruptedError",
    "build_model",
    "create_train_state",
    "cross_entropy",
    "decay_mask",
    "eval_step",
    "evaluate",
    "fit",
    "make_optimizer",
    "make_parallel",
    "make_schedule",
    "merge_model",
    "top_k_correct",
    "train_step",
]
