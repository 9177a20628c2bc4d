"""The `flax-attention-train` program (also `python -m train`); see `train.main`."""
