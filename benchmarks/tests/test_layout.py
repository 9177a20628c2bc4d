"""The product apart from the lab: the library's tests import nothing from `benchmarks`, and the
suites users run (`python -m benchmarks`) import nothing from `benchmarks.lab`."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BENCHMARKS = ROOT / "benchmarks"


def imported_modules(path: Path) -> set[str]:
    """Every module `path` imports, at any depth of its code (`from a import b` gives a and a.b)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def importers(paths: list[Path], package: str) -> dict[str, list[str]]:
    """The files of `paths` that import `package` or a module in it, with what they import."""
    out = {}
    for path in paths:
        hits = sorted(
            m
            for m in imported_modules(path)
            if m.split(".")[: package.count(".") + 1] == package.split(".")
        )
        if hits:
            out[str(path.relative_to(ROOT))] = hits
    return out


def test_library_tests_import_nothing_from_benchmarks():
    assert importers(sorted((ROOT / "tests").glob("*.py")), "benchmarks") == {}


def test_the_suites_import_nothing_from_the_lab():
    product = sorted(p for p in BENCHMARKS.glob("*.py"))
    assert importers(product, "benchmarks.lab") == {}


def test_the_lab_holds_the_profilers_table_writers_and_experiments():
    lab = BENCHMARKS / "lab"
    for name in ("profile_step", "profile_gates", "profiling", "auto_table", "headline"):
        assert (lab / f"{name}.py").is_file(), name
        assert not (BENCHMARKS / f"{name}.py").exists(), name
    for name in ("autotune", "multiprocess"):
        assert (lab / f"{name}.py").is_file(), name
    assert (lab / "experiments").is_dir() and not (BENCHMARKS / "experiments").exists()


def test_no_benchmark_subclasses_a_training_form():
    """The suites and the lab build the training library's parallel forms through their own
    options (composition), never by subclassing them."""
    forms = {"MeshForm", "PmapForm"}
    subclasses = []
    for path in sorted(BENCHMARKS.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                bases = {ast.unparse(base).rsplit(".", 1)[-1] for base in node.bases}
                if bases & forms:
                    subclasses.append(f"{path.relative_to(ROOT)}:{node.name}")
    assert subclasses == []
