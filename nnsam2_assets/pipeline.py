"""The pipeline's order, stated once: which assets run per dataset, which are pooled, and in what order.

A cohort runs in three phases: each dataset up to its pseudo-labels (one run per partition, so one bad
dataset never sinks the others), then the pooled nnU-Net models (each trained once, on every dataset),
then each dataset's final masks and metrics from the current stage-3 model. The runner, the jobs, the
new-data sensor and the benchmarks' Dagster-free path all read this module. Dagster-free.
"""

from __future__ import annotations

from dataclasses import dataclass

INGEST = ["scans", "reference_annotation", "reference_ranking"]
PER_DATASET = [*INGEST, "propagated_masks", "pseudo_labels"]
MODELS = ["nnunet_stage1", "nnunet_stage2", "nnunet_stage3"]
OUTPUTS = ["final_masks", "scan_metrics", "agreement", "cohort_report"]


@dataclass(frozen=True)
class Phase:
    name: str
    assets: list[str]
    per_dataset: bool


PHASES = (
    Phase("datasets", PER_DATASET, per_dataset=True),
    Phase("models", MODELS, per_dataset=False),
    Phase("outputs", OUTPUTS, per_dataset=True),
)
