"""The docs hold: every python snippet of the README and of docs/ runs as written, every
relative link in them points to an existing file and heading, the training program runs from
any directory, and its `--help` prints each default once."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from flax_attention.cli.train import build_parser, parse_config

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def python_snippets(page: Path) -> list[tuple[str, str]]:
    """(id, code) of every ```python block of `page`: id is the file, the section and the line."""
    snippets, section = [], "top"
    lines = page.read_text().splitlines()
    start = None
    for number, line in enumerate(lines, 1):
        if start is None and line.startswith("#"):
            section = line.lstrip("#").strip()
        if start is None and line.strip() == "```python":
            start = number
        elif start is not None and line.strip() == "```":
            name = f"{page.relative_to(ROOT)}: {section} (line {start})"
            snippets.append((name, "\n".join(lines[start : number - 1])))
            start = None
    return snippets


def distinct_snippets(pages: list[Path]) -> list[tuple[str, str]]:
    """The snippets of all `pages`, a block repeated word for word kept once (it runs once)."""
    seen: dict[str, str] = {}
    for page in pages:
        for name, code in python_snippets(page):
            seen.setdefault(code, name)
    return [(name, code) for code, name in seen.items()]


SNIPPETS = distinct_snippets(PAGES)


def test_the_readme_and_every_docs_page_have_python_snippets():
    assert len(python_snippets(README)) >= 3
    names = {page.stem for page in DOCS}
    assert {"modules", "models", "training", "input", "distributed", "performance"} <= names
    with_code = {page.stem for page in DOCS if python_snippets(page)}
    assert {"modules", "models", "training"} <= with_code


@pytest.mark.parametrize("code", [code for _, code in SNIPPETS], ids=[n for n, _ in SNIPPETS])
def test_doc_snippet_runs(code, tmp_path, monkeypatch):
    """Each snippet alone, in an empty directory, offline: it defines what it uses."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    exec(compile(code, "snippet", "exec"), {"__name__": "docs"})


def heading_anchors(page: Path) -> set[str]:
    """GitHub's anchors of the headings of `page` (outside code blocks)."""
    anchors, in_code = set(), False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            anchors.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return anchors


def broken_links(page: Path) -> list[str]:
    """The relative links of `page` whose file, or heading within it, does not exist."""
    broken = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists() or (anchor and anchor not in heading_anchors(linked)):
            broken.append(target)
    return broken


def test_a_link_to_a_missing_file_or_heading_is_found(tmp_path):
    (tmp_path / "other.md").write_text("# Other page\n\n## A part\n")
    page = tmp_path / "page.md"
    page.write_text(
        "[ok](other.md) [ok](other.md#a-part) [ok](#here) [web](https://x.org/a.md)\n"
        "# Here\n[gone](missing.md) [no heading](other.md#nowhere) [none here](#nowhere)\n"
    )
    assert broken_links(page) == ["missing.md", "other.md#nowhere", "#nowhere"]


@pytest.mark.parametrize(
    "page", [*PAGES, ROOT / "benchmarks" / "README.md"], ids=lambda p: str(p.relative_to(ROOT))
)
def test_every_relative_link_points_to_an_existing_file_and_heading(page):
    assert not broken_links(page)


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
