"""`python -m flax_attention.training [flags]`: the training program (`flax-attention-train`),
from any directory."""

from flax_attention.training.cli import main

raise SystemExit(main())
