"""`python -m train [flags]` from a checkout's root: `flax-attention train [flags]`, the
training program; its shipped configs are package data (`flax_attention/training/configs/`)."""

import sys

from flax_attention.cli import main

raise SystemExit(main(["train", *sys.argv[1:]]))
