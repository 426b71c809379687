"""The pipeline's order, stated once: which assets run per dataset, which are pooled, and in what order.

A cohort runs in three phases: each dataset up to its pseudo-labels (one run per partition, so one bad
dataset never sinks the others), then the pooled nnU-Net models (each trained once, on every dataset),
then each dataset's final masks and metrics from the current stage-3 model. The optional supervoxels phase
runs between the first two when the models centre their patches on supervoxels. The runner, the jobs, the
new-data sensor and the benchmarks' Dagster-free path all read this module. Dagster-free.
"""

from __future__ import annotations

from dataclasses import dataclass

INGEST = ["scans", "reference_annotation", "reference_ranking"]
PER_DATASET = [*INGEST, "propagated_masks", "pseudo_labels"]
# optional, per dataset: run when the stage trainings sample their patches on supervoxels, or on request
SUPERVOXELS = ["supervoxels"]
MODELS = ["nnunet_stage1", "nnunet_stage2", "nnunet_stage3"]
OUTPUTS = ["final_masks", "scan_metrics", "agreement", "cohort_report"]


@dataclass(frozen=True)
class Phase:
    name: str
    assets: list[str]
    per_dataset: bool
    optional: bool = False  # not part of a default run (``default_phases``)


PHASES = (
    Phase("datasets", PER_DATASET, per_dataset=True),
    Phase("supervoxels", SUPERVOXELS, per_dataset=True, optional=True),
    Phase("models", MODELS, per_dataset=False),
    Phase("outputs", OUTPUTS, per_dataset=True),
)


def default_phases(supervoxel_sampling: bool = False) -> tuple[str, ...]:
    """The phases a cohort run takes: every required one, and the supervoxels when the models sample on them."""
    return tuple(
        p.name for p in PHASES if not p.optional or (supervoxel_sampling and p.name == "supervoxels")
    )
