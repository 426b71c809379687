"""The nnsam2 code location: everything under ``defs/`` (assets, checks, sensors, schedules, jobs, resources),
run on the executor that ``NNSAM2_EXECUTOR`` names (``executors.py``: the multiprocess executor with the heavy
modules preloaded by default, or Celery workers)."""

from __future__ import annotations

from pathlib import Path

import dagster as dg

from nnsam2_assets.executors import code_location_executor


@dg.definitions
def defs() -> dg.Definitions:
    return dg.Definitions.merge(
        dg.load_from_defs_folder(path_within_project=Path(__file__).parent),
        dg.Definitions(executor=code_location_executor()),
    )


def all_assets() -> list:
    """Every asset of the code location (for in-process ``dg.materialize`` runs)."""
    return list(defs().assets or [])
