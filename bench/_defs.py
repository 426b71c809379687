"""A reconstructable per-dataset job on the multiprocess executor (each step a fresh process), for the
Dagster-overhead bench. Roots come from the environment so child step processes see the same resources."""

from __future__ import annotations

import os
from pathlib import Path

import dagster as dg

from bench._common import PER_DATASET, resources

DATA_ENV, STORAGE_ENV = "NNSAM2_BENCH_DATA_ROOT", "NNSAM2_BENCH_STORAGE_ROOT"


def per_dataset_job() -> dg.JobDefinition:
    from nnsam2_assets.definitions import all_assets
    from nnsam2_assets.defs.partitions import datasets_partitions

    job = dg.define_asset_job(
        "bench_per_dataset",
        selection=PER_DATASET,
        partitions_def=datasets_partitions,
        executor_def=dg.multiprocess_executor.configured({"max_concurrent": 2}),
    )
    defs = dg.Definitions(
        assets=all_assets(),
        jobs=[job],
        resources=resources(Path(os.environ[DATA_ENV]), Path(os.environ[STORAGE_ENV])),
    )
    return defs.resolve_job_def("bench_per_dataset")
