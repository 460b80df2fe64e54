"""Benchmarks: train and inference throughput, loop overhead, CPU scaling, a PyTorch baseline.

Run them from the repository root as modules, e.g. `python -m bench.train_throughput --help`.
BENCHMARKS.md has the commands and the measured numbers.
"""
