"""`python -m train [flags]` from a checkout's root: the `flax-attention-train` program
(`flax_attention.training.cli`; from any directory: `flax-attention-train` or
`python -m flax_attention.training`); the configs it ships are the files in `train/configs/`."""

from flax_attention.training.cli import main

raise SystemExit(main())
