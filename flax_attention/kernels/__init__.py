"""Hand-written kernels, each with its custom VJP, kept only where they measure faster than XLA
in the network: `max_pool` (ResNet's stem max pool with a scatter-free backward)."""
