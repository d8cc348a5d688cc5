"""Benchmarks: `python -m bench.train`, `python -m bench.embed` (results in docs/performance.md)."""
