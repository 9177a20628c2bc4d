"""PyTorch references (NCHW) for the parity tests and the benchmarks; needs torch.

Written from the project's specification of each module and model (kept outside this
repository), they reproduce the reference implementations' functions and state_dict key names:
`layers` holds the attention modules, `models` the ResNets built from them. The library never
imports this package; tests and benchmarks do (`pip install -e '.[test]'` brings torch).
"""
