"""Train an attention ResNet: `flax-attention train [flags]`, from any directory.

The same program: `python -m train` from a checkout's root (what `make train` runs). With no
flags: the `default` config (se_resnet18 on the embedded digits dataset, CPU in a few minutes)
into `runs/default` (relative paths are relative to the current directory). Values come from
the TrainConfig defaults, then the config file (`--config NAME` for a config shipped with the
package, or a YAML path), then the flags given. `--pretrained SOURCE` starts from saved or
PyTorch weights (fine-tuning). Intervals are steps (`--eval-every 100`) or epochs
(`--eval-every 2ep`).

Examples:
    flax-attention train
    flax-attention train --config cifar10 --data-dir ~/tensorflow_datasets --workdir runs/cifar10
    flax-attention train --model cbam_resnet50 --dataset imagenet2012 --parallel jit --precision bf16
    flax-attention train --config cifar10 --model resnet50 --pretrained default --workdir runs/ft
    flax-attention train --config imagenet_resnet50 --distributed   # one process per host
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import Any

import yaml

from flax_attention.cli.common import Parser
from flax_attention.errors import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    os_error_exit,
    report_bug,
)
from flax_attention.training import config as training_config
from flax_attention.training.config import (
    ConfigError,
    TrainConfig,
    check_values,
    field_help,
)

# The shipped configs: package data of `flax_attention.training`, beside `TrainConfig`.
CONFIG_DIR = Path(training_config.__file__).with_name("configs")
DEFAULT_CONFIG = "default"
PROGRAM = "flax-attention train"


class _YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader, also reading `1e-3` (no dot) as a float, as YAML 1.2 does, and
    refusing a key given twice in one mapping (a merge key's `<<` entries may be overridden)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, Hashable):
                continue  # the base constructor refuses it
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d[\d_]*(?:\.\d*)?|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def load_config_file(name_or_path: str) -> dict[str, Any]:
    """The checked values in YAML file `name_or_path`, or in the shipped config `name`.

    Raises `ConfigError` (one line naming the file) for a missing or unreadable file, a YAML
    syntax error, a document that is not a mapping, an unknown key or a bad value.
    """
    path = Path(name_or_path).expanduser()
    if not path.is_file():
        path = CONFIG_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
        raise ConfigError(f"no config file {name_or_path!r}; known configs: {known}")
    try:
        values = yaml.load(path.read_text(), Loader=_YamlLoader)
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte {err.start})") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or type(err).__name__
        raise ConfigError(f"{path}: invalid YAML{where}: {problem}") from None
    try:
        return check_values({} if values is None else values)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _interval(text: str) -> int | str:
    """An interval flag: an integer number of steps, or a number of epochs such as `2ep`."""
    return int(text) if text.lstrip("+-").isdigit() else text


# field annotation -> (argparse type, metavar; None: the field's name)
_FLAG_TYPES: dict[str, tuple[Any, str | None]] = {
    "int": (int, "N"),
    "int | None": (int, "N"),
    "float": (float, "X"),
    "str": (str, None),
    "str | None": (str, None),
    "int | str": (_interval, "N|Xep"),
}


# Flags whose value is better named by what it is than by the field's name.
_METAVARS = {"pretrained": "SOURCE"}


def _metavar(field: dataclasses.Field, choices: list[str] | None) -> str:
    if field.name in _METAVARS:
        return _METAVARS[field.name]
    if choices and len(choices) <= 6:
        return "{" + ",".join(choices) + "}"
    if field.name.endswith("dir"):
        return "DIR"
    return _FLAG_TYPES[field.type][1] or field.name.upper()


# "(default: ...)" in a field's help: what its default of None means.
_STATED_DEFAULT = re.compile(r"\s*\(default: [^)]*\)")


def _help_with_default(text: str, default: Any) -> str:
    """A field's help `text` as an argparse help string that shows its default once: `default`
    itself, or for a default of None the meaning the help states, if it states one."""
    if default is None and _STATED_DEFAULT.search(text):
        return text.replace("%", "%%")
    return _STATED_DEFAULT.sub("", text).replace("%", "%%") + " (default: %(default)s)"


def build_parser(defaults: dict[str, Any]) -> argparse.ArgumentParser:
    """The program's parser: `--config` and one flag per `TrainConfig` field
    (except `model_kwargs`, a config-file key), each defaulting to `defaults[name]`."""
    parser = Parser(
        prog=PROGRAM,
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument(
        "--config",
        default=DEFAULT_CONFIG,
        metavar="NAME",
        help=f"config name ({', '.join(_known_configs())}) or a YAML path (default: %(default)s)",
    )
    for field in dataclasses.fields(TrainConfig):
        if field.name == "model_kwargs":
            continue
        text, choices = field_help(field)
        text = _help_with_default(text, defaults[field.name])
        if field.type == "bool":
            kwargs: dict[str, Any] = {"action": argparse.BooleanOptionalAction}
        else:
            kwargs = {"type": _FLAG_TYPES[field.type][0], "choices": choices}
            kwargs["metavar"] = _metavar(field, choices)
        parser.add_argument(_flag(field.name), default=defaults[field.name], help=text, **kwargs)
    return parser


def parse_config(argv: Sequence[str] | None) -> TrainConfig:
    """The config of command line `argv`: defaults, then the config file, then the flags given.
    Raises `ConfigError` for a bad config file or value; exits with status 2 on a bad flag."""
    first = Parser(prog=PROGRAM, add_help=False)
    first.add_argument("--config", default=DEFAULT_CONFIG)
    known, _ = first.parse_known_args(argv)
    defaults = {**_dataclass_defaults(), **load_config_file(known.config)}
    args = build_parser(defaults).parse_args(argv)
    values = {name: getattr(args, name, defaults[name]) for name in defaults}
    return TrainConfig.from_dict(values)


def flags_markdown() -> str:
    """The flag table of docs/training.md, generated from `TrainConfig`
    (tests/test_train_config.py checks that the page holds exactly this)."""
    rows = [
        "| flag | default | meaning |",
        "|---|---|---|",
        f"| `--config NAME` | `{DEFAULT_CONFIG}` | shipped config ({', '.join(_known_configs())})"
        " or a YAML path |",
    ]
    defaults = _dataclass_defaults()
    for field in dataclasses.fields(TrainConfig):
        text, choices = field_help(field)
        default = defaults[field.name]
        if field.name == "model_kwargs":
            flag = "`model_kwargs:` (YAML only)"
        elif field.type == "bool":
            flag = f"`--[no-]{field.name.replace('_', '-')}`"
            default = "on" if default else "off"
        else:
            flag = f"`{_flag(field.name)} {_metavar(field, choices)}`"
        shown = f"`{default}`" if isinstance(default, int | float | str) else "-"  # not None, {}
        rows.append(f"| {flag} | {shown} | {text} |")
    return "\n".join(rows) + "\n"


def _dataclass_defaults() -> dict[str, Any]:
    """Each field's default, without building (and so validating) a config."""
    return {
        f.name: f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
        for f in dataclasses.fields(TrainConfig)
    }


def _known_configs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def main(argv: Sequence[str] | None = None) -> int:
    """Run the program; returns the exit status (see `flax_attention.errors`: 0 ok, 1 failed
    run, 2 usage error, 130 Ctrl-C). A bug prints its traceback, then one `error:` line."""
    try:
        config = parse_config(argv)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    from flax_attention.training import TrainingInterruptedError, fit

    try:
        result = fit(config)
    except TrainingInterruptedError as err:
        print(err, file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as err:  # each kind gets its exit status in _report_failure
        return _report_failure(err)
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


def _usage_errors() -> tuple[type[BaseException], ...]:
    """What the user can fix (exit 2): a bad value, a dataset not prepared or a corrupt data
    file, a workdir file that is not ours to read, an existing run's checkpoints of another
    model or optimizer (or with --no-resume)."""
    from flax_attention.data import DatasetNotFoundError
    from flax_attention.errors import DataFileError, RunFileError
    from flax_attention.training.checkpointing import CheckpointMismatchError

    usage = ConfigError, DatasetNotFoundError, DataFileError, RunFileError, CheckpointMismatchError
    return (*usage, FileExistsError)


def _run_failures() -> tuple[type[BaseException], ...]:
    """Runs that failed for a reason reported in one line (exit 1)."""
    from flax_attention.training import CorruptCheckpointError, TrainingDivergedError
    from flax_attention.training.checkpointing import CheckpointReadError

    return TrainingDivergedError, CorruptCheckpointError, CheckpointReadError


def _report_failure(err: Exception) -> int:
    """Print `err` as one `error:` line and return its exit status; anything not known to be
    the user's or the machine's problem is a bug: its traceback, then one line, exit 1."""
    if isinstance(err, _usage_errors()):
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    if isinstance(err, _run_failures()):
        print(f"error: {err}", file=sys.stderr)
        return EXIT_FAILED
    known = os_error_exit(err) if isinstance(err, OSError) else None
    if known is not None:
        status, message = known
        print(f"error: {message}", file=sys.stderr)
        return status
    return report_bug(err)
