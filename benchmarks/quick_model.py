"""The model that `--quick` runs (the CPU smoke tests of the suites) train: a one-stage SE
ResNet of basic blocks, registered under `QUICK_MODEL` only while a quick run needs it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

QUICK_MODEL = "tiny_se_resnet"


def register_quick_model() -> str:
    """Register `QUICK_MODEL` in the model registry of this process; returns its name."""
    from flax_attention.models import MODELS, BasicBlock, ModelSpec

    MODELS[QUICK_MODEL] = ModelSpec(
        QUICK_MODEL, BasicBlock, (1,), "none", "official", {"attention": "se"}
    )
    return QUICK_MODEL


@contextlib.contextmanager
def quick_model_registered() -> Iterator[str]:
    """`QUICK_MODEL` registered inside, removed again on exit unless it was there before."""
    from flax_attention.models import MODELS

    already = QUICK_MODEL in MODELS
    try:
        yield register_quick_model()
    finally:
        if not already:
            MODELS.pop(QUICK_MODEL, None)
