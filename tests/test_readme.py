"""The docs hold: every python snippet of the README runs as written, the training program runs
from any directory, and its `--help` prints each default once."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from flax_attention.cli.train import build_parser, parse_config

README = Path(__file__).resolve().parents[1] / "README.md"


def python_snippets() -> list[tuple[str, str]]:
    """(id, code) of every ```python block of the README: id is the section and the line."""
    snippets, section = [], "top"
    lines = README.read_text().splitlines()
    start = None
    for number, line in enumerate(lines, 1):
        if start is None and line.startswith("#"):
            section = line.lstrip("#").strip()
        if start is None and line.strip() == "```python":
            start = number
        elif start is not None and line.strip() == "```":
            snippets.append((f"{section} (line {start})", "\n".join(lines[start : number - 1])))
            start = None
    return snippets


SNIPPETS = python_snippets()


def test_the_readme_has_python_snippets():
    assert len(SNIPPETS) >= 5, [name for name, _ in SNIPPETS]


@pytest.mark.parametrize("code", [code for _, code in SNIPPETS], ids=[n for n, _ in SNIPPETS])
def test_readme_snippet_runs(code, tmp_path, monkeypatch):
    """Each snippet alone, in an empty directory, offline: it defines what it uses."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    exec(compile(code, "README.md", "exec"), {"__name__": "readme"})


def test_training_program_runs_from_any_directory(tmp_path):
    """`flax-attention train` (here `python -m flax_attention.cli train`) outside the checkout
    finds its shipped configs."""
    command = [sys.executable, "-m", "flax_attention.cli", "train", "--config", "cifar10", "--help"]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "cifar10, default, imagenet_resnet50" in done.stdout
    assert "(default: runs/cifar10)" in done.stdout  # the config's workdir


def help_entries(argv: list[str]) -> dict[str, str]:
    """{flag: its help entry, whitespace collapsed} of the program's `--help` for `argv`."""
    config = parse_config(argv)
    defaults = {name: getattr(config, name) for name in config.__dataclass_fields__}
    text = build_parser(defaults).format_help()
    options = text.split("options:\n", 1)[1].split("\n\n", 1)[0]
    entries = re.split(r"\n  (?=-)", options)
    return {entry.split()[0].rstrip(","): " ".join(entry.split()) for entry in entries}


def test_help_prints_each_default_once():
    entries = help_entries([])
    doubled = {flag: e for flag, e in entries.items() if e.count("(default:") > 1}
    assert not doubled
    missing = {flag: e for flag, e in entries.items() if flag != "-h" and "(default:" not in e}
    assert not missing
    assert entries["--eval-batch-size"].endswith("(default: batch_size)")


def test_help_prints_a_configured_value_instead_of_the_fields_default_text():
    entries = help_entries(["--eval-batch-size", "32", "--image-size", "24"])
    assert entries["--eval-batch-size"].endswith("evaluation batch size (default: 32)")
    assert entries["--image-size"].endswith("input resolution (default: 24)")
