"""The thin Dagster layer: one module per pipeline stage, read by ``definitions.py``."""
