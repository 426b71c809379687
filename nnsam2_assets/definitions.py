"""The nnsam2 code location: assets, checks, automation, sensors, schedules, jobs, resources, executor."""

from __future__ import annotations

import dagster as dg
from dagster_duckdb import DuckDBResource

from nnsam2_assets import settings
from nnsam2_assets.defs import ingest, jobs, metrics, propagation, refinement, sensors
from nnsam2_assets.defs.resources import NnsamStorage, PropagationSettings, RefinementSettings

ASSET_MODULES = [ingest, propagation, refinement, metrics]


def all_assets() -> list:
    return list(dg.load_assets_from_modules(ASSET_MODULES))


def default_resources() -> dict:
    return {
        "storage": NnsamStorage(),
        "propagation": PropagationSettings(),
        "refinement": RefinementSettings(),
        "metrics_db": DuckDBResource(database=str(settings.duckdb_path())),
    }


@dg.definitions
def defs() -> dg.Definitions:
    return dg.Definitions(
        assets=all_assets(),
        asset_checks=list(dg.load_asset_checks_from_modules(ASSET_MODULES)),
        jobs=jobs.all_jobs(),
        sensors=sensors.all_sensors(),
        schedules=sensors.all_schedules(),
        resources=default_resources(),
        # spawn-based: each step is a fresh process, which also frees GPU memory between steps
        executor=dg.multiprocess_executor.configured({"max_concurrent": 2}),
    )
