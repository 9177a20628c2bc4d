"""`python -m flax_attention.cli`: the `flax-attention` command."""

import sys

from flax_attention.cli import main

sys.exit(main())
