"""The README's module example runs as written."""

from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_module_example_runs():
    text = README.read_text()
    section = text.split("## Modules", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    namespace: dict = {}
    exec(compile(code, "README.md#modules", "exec"), namespace)
    assert namespace["y"].shape == (8, 56, 56, 256)
    assert namespace["z"].shape == (8, 28, 28, 256)
