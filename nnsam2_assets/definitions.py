"""The nnsam2 code location: everything under ``defs/`` (assets, checks, sensors, schedules, jobs, resources),
run on the multiprocess executor."""

from __future__ import annotations

from pathlib import Path

import dagster as dg


@dg.definitions
def defs() -> dg.Definitions:
    return dg.Definitions.merge(
        dg.load_from_defs_folder(path_within_project=Path(__file__).parent),
        # spawn-based: each step is a fresh process, which also frees GPU memory between steps
        dg.Definitions(executor=dg.multiprocess_executor.configured({"max_concurrent": 2})),
    )


def all_assets() -> list:
    """Every asset of the code location (for in-process ``dg.materialize`` runs)."""
    return list(defs().assets or [])
