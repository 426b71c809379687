"""The nnsam2 code location: everything under ``defs/`` (assets, checks, sensors, schedules, jobs, resources),
run on the executor that ``NNSAM2_EXECUTOR`` names (``executors.py``: the multiprocess executor with the heavy
modules preloaded by default, or Celery workers).

The definitions are built once per process and environment: every step process of a run asks for them
(twice per step), and walking ``defs/`` and building the repository took about 0.3 s each time."""

from __future__ import annotations

import functools
import multiprocessing
import os
import sys
from pathlib import Path

import dagster as dg

from nnsam2_assets.executors import code_location_executor, start_step_server_early

# before the definitions are built (about 2 s): a process launched to execute a job starts its steps' fork
# server now, so the two load side by side
start_step_server_early(sys.argv, multiprocessing.current_process())

# what building the definitions reads from the environment: the resources, sensor settings and executor
# (NNSAM2_ variables), the Dagster home, and the working directory the default home folder is relative to
ENVIRONMENT_PREFIX = "NNSAM2_"


def _environment() -> tuple[tuple[str, str], ...]:
    read = {k: v for k, v in os.environ.items() if k.startswith(ENVIRONMENT_PREFIX) or k == "DAGSTER_HOME"}
    return (*sorted(read.items()), ("cwd", os.getcwd()))


@functools.cache
def _definitions(environment: tuple[tuple[str, str], ...]) -> dg.Definitions:
    del environment  # the cache key: a changed variable or directory builds them again
    return dg.Definitions.merge(
        dg.load_from_defs_folder(path_within_project=Path(__file__).parent),
        dg.Definitions(executor=code_location_executor()),
    )


@dg.definitions
def defs() -> dg.Definitions:
    return _definitions(_environment())


def all_assets() -> list:
    """Every asset of the code location (for in-process ``dg.materialize`` runs)."""
    return list(defs().assets or [])
