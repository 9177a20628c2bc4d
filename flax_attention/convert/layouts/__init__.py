"""The PyTorch key-name layouts the converter reads and writes, by name.

Each layout is one module of this package whose `KEY_MAP` gives every convertible module class
its table (`flax_attention.convert.tables`). Adding a layout is adding its module and its line
to `KEY_MAPS`; nothing registers itself on import.
"""

from __future__ import annotations

from flax_attention.convert.layouts import official, timm
from flax_attention.convert.tables import KeyMap

KEY_MAPS: dict[str, KeyMap] = {"official": official.KEY_MAP, "timm": timm.KEY_MAP}
LAYOUTS: tuple[str, ...] = tuple(KEY_MAPS)
