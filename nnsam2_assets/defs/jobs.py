"""Jobs: the per-dataset chain, and the pooled refinement (trains each stage once, predicts everything)."""

from __future__ import annotations

import dagster as dg

PER_DATASET_GROUPS = ["ingest", "propagation"]

dataset_job = dg.define_asset_job(
    "dataset_job",
    selection=dg.AssetSelection.groups(*PER_DATASET_GROUPS),
    description="Ingest, frames, propagation and pseudo-labels for one dataset partition.",
)


def all_jobs() -> list:
    from nnsam2_assets.defs.sensors import refinement_job

    return [dataset_job, refinement_job]
