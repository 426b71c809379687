"""Environment-driven defaults shared by the CLI and the Dagster resources.

Everything lives under one home folder (``NNSAM2_HOME``, default ``./.nnsam2`` in the working directory):
the data root users drop datasets into, the storage root for artefacts, and the DuckDB file.
"""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    return Path(os.environ.get("NNSAM2_HOME", Path.cwd() / ".nnsam2")).resolve()


def data_root() -> Path:
    return Path(os.environ.get("NNSAM2_DATA_ROOT", home() / "data")).resolve()


def storage_root() -> Path:
    return Path(os.environ.get("NNSAM2_STORAGE_ROOT", home() / "storage")).resolve()


def duckdb_path() -> Path:
    # never name the file like its schema ("metrics"): DuckDB then reports an ambiguous catalog
    return Path(os.environ.get("NNSAM2_DUCKDB", storage_root() / "nnsam2.duckdb")).resolve()


def dagster_home() -> Path:
    return Path(os.environ.get("DAGSTER_HOME", home() / "dagster_home")).resolve()
