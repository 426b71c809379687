"""The direct side of the step fixed-cost row (``bench.overhead.bench_cli_overhead``): the per-dataset chain's
domain calls (``nnsam2_assets.testing.direct``, which never imports Dagster) in a fresh process, so that CLI
minus direct holds all of Dagster's cost. Default settings: the registration backend, as a run without SAM2.

Run as ``python -m bench.direct_chain DATASET`` with ``NNSAM2_DATA_ROOT`` and ``NNSAM2_STORAGE_ROOT`` set."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from nnsam2_assets.core.layout import DATA_ROOT_ENV, STORAGE_ROOT_ENV
from nnsam2_assets.testing.direct import DirectRun, run_direct

if __name__ == "__main__":
    data, storage = Path(os.environ[DATA_ROOT_ENV]), Path(os.environ[STORAGE_ROOT_ENV])
    run_direct(DirectRun(data, storage, [sys.argv[1]]), phases=("datasets",))
