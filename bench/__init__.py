"""Benchmarks (``bench/run.py`` is the one entry point)."""
