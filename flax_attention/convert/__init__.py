"""PyTorch checkpoint conversion: key maps, state_dict load/export, checkpoint files."""

from flax_attention.convert.files import load_torch_checkpoint
from flax_attention.convert.layouts import LAYOUTS
from flax_attention.convert.state_dict import (
    LoadReport,
    StateDictMismatchError,
    load_torch_state_dict,
    to_torch_state_dict,
)

__all__ = [
    "LAYOUTS",
    "LoadReport",
    "StateDictMismatchError",
    "load_torch_checkpoint",
    "load_torch_state_dict",
    "to_torch_state_dict",
]
