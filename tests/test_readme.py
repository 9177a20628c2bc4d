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


def test_headline_table_is_the_one_its_train_result_gives():
    """The README's training-speed table is `python -m benchmarks.headline` of the result file
    its caption names, so every number in it comes from one committed run."""
    import json
    import re

    from benchmarks.headline import headline

    text = README.read_text()
    named = re.findall(r"Training step on one .*?`(benchmarks/results/[^`]+/train\.json)`", text)
    assert len(named) == 1, named
    source = Path(named[0])
    result = json.loads((README.parent / source).read_text())
    assert headline(result, source) in text
