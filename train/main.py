"""Train an attention ResNet: `flax-attention-train [flags]` or `python -m train [flags]`.

With no flags: `train/configs/default.yaml` (se_resnet18 on the embedded digits dataset, CPU in a
few minutes) into `runs/default`. Values come from the dataclass defaults, then the config file
(`--config NAME` for `train/configs/NAME.yaml`, or a path), then the flags given.

Examples:
    python -m train
    python -m train --config cifar10 --data-dir ~/tensorflow_datasets --workdir runs/cifar10
    python -m train --model cbam_resnet50 --dataset imagenet2012 --parallel jit --precision bf16
    python -m train --config imagenet_resnet50 --distributed   # one process per host
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

CONFIG_DIR = Path(__file__).parent / "configs"
DEFAULT_CONFIG = "default"

# flag -> (type, help); the config key is the flag with "-" -> "_".
FLAGS: dict[str, tuple[Any, str]] = {
    "--model": (str, "registered model name (flax-attention list)"),
    "--dataset": (str, "digits (embedded), cifar10, cifar100 or imagenet2012"),
    "--data-dir": (str, "tfds data_dir holding the prepared dataset"),
    "--workdir": (str, "where checkpoints, metrics.jsonl, metrics.png and model/ go"),
    "--steps": (int, "number of optimizer steps (wins over --epochs)"),
    "--epochs": (float, "number of passes over the training split"),
    "--batch-size": (int, "global batch size (all devices and hosts)"),
    "--eval-batch-size": (int, "global evaluation batch size (default: --batch-size)"),
    "--image-size": (int, "input resolution (default: the dataset's)"),
    "--lr": (float, "peak learning rate"),
    "--optimizer": (str, "sgd, lars or adamw"),
    "--schedule": (str, "cosine or constant (both after a linear warm-up)"),
    "--warmup-steps": (int, "linear warm-up steps"),
    "--weight-decay": (float, "weight decay on conv/linear kernels"),
    "--momentum": (float, "SGD/LARS momentum, AdamW beta1"),
    "--label-smoothing": (float, "label smoothing of the cross-entropy"),
    "--parallel": (str, "jit (mesh over all devices), pmap, or none (one device)"),
    "--precision": (str, "fp32, or bf16 (bfloat16 compute, float32 parameters)"),
    "--seed": (int, "seed of the initialisation and the data order"),
    "--log-every": (int, "steps between metrics.jsonl records"),
    "--eval-every": (int, "steps between evaluations (0: only at the end)"),
    "--checkpoint-every": (int, "steps between checkpoints"),
    "--keep-checkpoints": (int, "how many checkpoints to keep"),
    "--num-workers": (int, "data loading worker processes (0: threads in this process)"),
    "--decoder": (str, "JPEG decoding: cpu, gpu (nvImageCodec) or auto (gpu when available)"),
}
SWITCHES: dict[str, str] = {
    "--resume": "resume from the newest checkpoint in --workdir (default: yes)",
    "--nesterov": "Nesterov momentum (SGD/LARS)",
    "--distributed": "call jax.distributed.initialize() (multi-host: one process per host)",
    "--progress": "show progress bars",
}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="flax-attention-train",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument(
        "--config",
        default=DEFAULT_CONFIG,
        help=f"config name in {CONFIG_DIR} or a YAML path (default: {DEFAULT_CONFIG})",
    )
    for flag, (kind, text) in FLAGS.items():
        parser.add_argument(flag, type=kind, default=None, help=text)
    for flag, text in SWITCHES.items():
        parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
    return parser.parse_args(argv)


def load_config_file(name_or_path: str) -> dict[str, Any]:
    """The mapping in YAML file `name_or_path`, or in `train/configs/<name>.yaml`."""
    path = Path(name_or_path)
    if not path.is_file():
        path = CONFIG_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
        raise FileNotFoundError(f"no config file {name_or_path!r}; known configs: {known}")
    return yaml.safe_load(path.read_text()) or {}


def make_config(args: argparse.Namespace) -> Any:
    """TrainConfig from the config file overridden by the flags that were given."""
    from flax_attention.training import TrainConfig

    values = load_config_file(args.config)
    values.update({k: v for k, v in vars(args).items() if k != "config" and v is not None})
    return TrainConfig.from_dict(values)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the program; returns the exit status (0 ok, 1 failed run, 2 bad setup, 130 Ctrl-C)."""
    args = parse_args(argv)
    from flax_attention.data import DatasetNotFoundError
    from flax_attention.training import (
        CorruptCheckpointError,
        TrainingDivergedError,
        TrainingInterruptedError,
        fit,
    )

    try:
        config = make_config(args)
        result = fit(config)
    except (DatasetNotFoundError, FileNotFoundError, FileExistsError, ValueError, KeyError) as err:
        print(f"error: {_message(err)}", file=sys.stderr)
        return 2
    except (TrainingDivergedError, CorruptCheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except TrainingInterruptedError as err:
        print(err, file=sys.stderr)
        return 130
    import jax

    if jax.process_index() == 0:
        print(
            f"final test accuracy: {100 * result['eval_top1']:.2f}% "
            f"(top-5 {100 * result['eval_top5']:.2f}%, loss {result['eval_loss']:.4f}) "
            f"after {result['step']} steps\n"
            f"model checkpoint: {result['model_dir']}\n"
            f"plot: {result['plot']}\n"
            f"metrics: {Path(config.workdir).absolute() / 'metrics.jsonl'}"
        )
    return 0


def _message(err: BaseException) -> str:
    return err.args[0] if isinstance(err, KeyError) and err.args else str(err)
