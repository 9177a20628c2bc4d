"""The training program's home in a checkout: `python -m train` and `train/configs/*.yaml`.
Not installed: the program is `flax_attention.training.cli` (`flax-attention-train`)."""
