"""Benchmarks of gemma4-mlx (run from the repository root: ``python -m bench.compare``)."""
