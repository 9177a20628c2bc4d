"""One-off measurements behind choices the library makes, kept runnable.

Each is `python -m benchmarks.lab.experiments.<name> [--quick] [--out DIR]` and writes
`<out>/<name>.json` (by default under benchmarks/lab/experiments/results/<device>/). They time the
library through its public arguments; the suites users run are in the folder above.

- `psa_convs`: PSA's branch convolutions in each formulation (`branch_convs.FORMULATIONS`),
  the measurements behind the PSA rows of `layers.policy`.
- `xla_flags`: the train suite's step under other XLA GPU flags (CUDA graphs, cuBLAS GEMMs),
  a process per variant; none measured faster (docs/measurements.md, 2026-12-06).
"""
