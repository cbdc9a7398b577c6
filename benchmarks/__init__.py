"""Benchmarks, each runnable as `python -m benchmarks.bench_x`; benchmarks/utils.py holds the one timer."""
