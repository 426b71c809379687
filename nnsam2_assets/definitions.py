"""The nnsam2 code location: assets, checks, automation, sensors, schedules, jobs, resources, executor."""

from __future__ import annotations

import dagster as dg

from nnsam2_assets.defs import ingest, jobs, sensors
from nnsam2_assets.defs.resources import NnsamStorage, PropagationSettings, RefinementSettings

ASSET_MODULES = [ingest]


def all_assets() -> list:
    return [a for m in ASSET_MODULES for a in dg.load_assets_from_modules([m])]


def default_resources() -> dict:
    return {
        "storage": NnsamStorage(),
        "propagation": PropagationSettings(),
        "refinement": RefinementSettings(),
    }


@dg.definitions
def defs() -> dg.Definitions:
    return dg.Definitions(
        assets=all_assets(),
        asset_checks=[c for m in ASSET_MODULES for c in dg.load_asset_checks_from_modules([m])],
        jobs=jobs.all_jobs(),
        sensors=sensors.all_sensors(),
        schedules=sensors.all_schedules(),
        resources=default_resources(),
        # spawn-based: each step is a fresh process, which also frees GPU memory between steps
        executor=dg.multiprocess_executor.configured({"max_concurrent": 2}),
    )
