"""Helpers that the tests and the benchmarks share (both import this package, never each other): real-data
dataset builders, tiny phantom datasets, taking a scan out and back, and the pipeline without Dagster.
The product never imports it."""
