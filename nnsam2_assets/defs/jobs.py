"""Jobs and the asset selections they, the sensor and the schedules launch (from ``pipeline``)."""

from __future__ import annotations

import dagster as dg

from nnsam2_assets.executors import job_executor
from nnsam2_assets.pipeline import MODELS, OUTPUTS, PER_DATASET

# what new data runs: a dataset's chain, then its final masks and metrics once a stage-3 model exists
NEW_DATA_SELECTION = dg.AssetSelection.assets(*PER_DATASET, *OUTPUTS)

dataset_job = dg.define_asset_job(
    "dataset_job",
    selection=dg.AssetSelection.assets(*PER_DATASET),
    description="Ingest, propagation and pseudo-labels for one dataset partition.",
    executor_def=job_executor("dataset_job"),
)

refinement_job = dg.define_asset_job(
    "refinement_job",
    selection=dg.AssetSelection.assets(*MODELS),
    description="Train the three pooled nnU-Net stages once each (each predicts every scan).",
)
