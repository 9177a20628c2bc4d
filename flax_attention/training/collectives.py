"""Collective operations in a compiled step's HLO: how the parallel forms' steps are checked
to synchronise what they should, and no more."""

from __future__ import annotations

import re

_COLLECTIVE = re.compile(
    r"\s(all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)(?:-start)?\("
)


def count_collectives(hlo_text: str) -> dict[str, int]:
    """Collective ops in an HLO module's text (`compiled.as_text()`), by kind, plus "total";
    an asynchronous pair (`all-reduce-start`/`-done`) counts once."""
    counts: dict[str, int] = {}
    for match in _COLLECTIVE.finditer(hlo_text):
        counts[match[1]] = counts.get(match[1], 0) + 1
    return {**dict(sorted(counts.items())), "total": sum(counts.values())}
