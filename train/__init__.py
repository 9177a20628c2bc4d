"""The training program's entry in a checkout: `python -m train` (what `make train` runs).
Not installed: the program is `flax-attention train` (`flax_attention.cli.train`)."""
