"""`python -m train [flags]` from a checkout: the `flax-attention-train` program
(`flax_attention.training.cli`); the configs it ships are the files in `train/configs/`."""

from flax_attention.training.cli import main

raise SystemExit(main())
