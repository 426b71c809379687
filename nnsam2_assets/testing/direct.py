"""The pipeline without Dagster (this module never imports it): the same domain calls the assets make, in
``pipeline.PHASES`` order, on the same files and per-scan caches. The benchmarks compare it with the Dagster
runs to measure what the framework adds; what the assets add on top (previews, metadata tables, checks) is
charged to Dagster, so the ratio is conservative."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import duckdb
import pandas as pd

from nnsam2_assets.core import silent
from nnsam2_assets.core.layout import DatasetLayout, duckdb_path
from nnsam2_assets.ingest import annotation, ranking
from nnsam2_assets.ingest.convention import DatasetSpec, load_dataset
from nnsam2_assets.ingest.scans import ingest_scans
from nnsam2_assets.metrics.qc import QCConfig
from nnsam2_assets.metrics.steps import dataset_metrics, write_agreement
from nnsam2_assets.metrics.store import replace_dataset
from nnsam2_assets.outputs.report import build_report
from nnsam2_assets.pipeline import PHASES, default_phases
from nnsam2_assets.propagation.settings import PropagationConfig
from nnsam2_assets.propagation.steps import propagate_masks, propagated_scans
from nnsam2_assets.pseudolabels.selection import SelectionConfig
from nnsam2_assets.pseudolabels.steps import select_pseudo_labels
from nnsam2_assets.refinement import stages
from nnsam2_assets.refinement.final_masks import make_final_masks
from nnsam2_assets.refinement.pool import Pool, build_pool
from nnsam2_assets.refinement.rules import STAGE_RULES
from nnsam2_assets.refinement.settings import RefinementConfig
from nnsam2_assets.supervoxels.steps import build_supervoxels, method_for, method_id_for


@dataclass
class DirectRun:
    data_root: Path
    storage_root: Path
    datasets: list[str]
    refinement: RefinementConfig = field(default_factory=RefinementConfig)
    propagation: PropagationConfig = field(default_factory=PropagationConfig)
    run_id: str = "direct"

    def spec(self, name: str) -> DatasetSpec:
        return load_dataset(self.data_root, name)

    def layout(self, name: str) -> DatasetLayout:
        return DatasetLayout(self.storage_root, name)

    def pool(self) -> Pool:
        return build_pool(self.storage_root, self.datasets, self.spec, log=silent)

    def write_rows(self, name: str, tables: dict[str, pd.DataFrame]) -> None:
        replace_dataset(duckdb_path(self.storage_root), name, tables)


def _scan_metrics(run: DirectRun, name: str) -> None:
    run.write_rows(name, dataset_metrics(run.spec(name), run.layout(name), QCConfig(), run.run_id).tables)


def _agreement(run: DirectRun, name: str) -> None:
    write_agreement(lambda: duckdb.connect(str(duckdb_path(run.storage_root))), name, run.run_id)


def _next_stage(stage: str) -> Callable[[DirectRun, None], None]:
    def step(run: DirectRun, _: None) -> None:
        profile = run.refinement.profile_obj()
        stages.run_next_stage(stage, run.pool(), run.storage_root, profile, STAGE_RULES[stage], log=silent)

    return step


# asset name -> its domain call; a per-dataset step takes the dataset name, a pooled one None
STEPS: dict[str, Callable[[DirectRun, str | None], object]] = {
    "scans": lambda run, n: ingest_scans(run.spec(n), run.layout(n)),
    "reference_annotation": lambda run, n: annotation.write_reference_annotation(run.spec(n), run.layout(n)),
    "reference_ranking": lambda run, n: ranking.rank_dataset(run.spec(n), run.layout(n)),
    "propagated_masks": lambda run, n: propagate_masks(
        run.spec(n),
        run.layout(n),
        run.propagation.build,
        run.propagation.identity(),
        workers=run.propagation.worker_count(),
    ),
    "pseudo_labels": lambda run, n: select_pseudo_labels(run.spec(n), run.layout(n), SelectionConfig()),
    "supervoxels": lambda run, n: build_supervoxels(
        run.spec(n), run.layout(n), partial(method_for, run.propagation), method_id_for(run.propagation)
    ),
    "nnunet_stage1": lambda run, _: stages.run_stage1(
        run.pool(), run.storage_root, run.refinement.profile_obj(), log=silent
    ),
    "nnunet_stage2": _next_stage("stage2"),
    "nnunet_stage3": _next_stage("stage3"),
    "final_masks": lambda run, n: make_final_masks(
        run.spec(n),
        run.layout(n),
        propagated_scans(run.layout(n)),
        run.storage_root,
        run.refinement.device,
        log=silent,
    ),
    "scan_metrics": _scan_metrics,
    "agreement": _agreement,
    "cohort_report": lambda run, n: build_report(run.spec(n), run.layout(n), duckdb_path(run.storage_root)),
}


def run_direct(run: DirectRun, phases: tuple[str, ...] = default_phases()) -> dict[str, float]:
    """Every asset of the named phases, in pipeline order; seconds per part, keyed as the runner keys them
    (``<phase>/<dataset>`` per dataset, ``<phase>`` when pooled)."""
    timings: dict[str, float] = {}
    for phase in PHASES:
        if phase.name not in phases:
            continue
        for name in run.datasets if phase.per_dataset else [None]:
            t0 = time.perf_counter()
            for asset in phase.assets:
                STEPS[asset](run, name)
            timings[phase.name if name is None else f"{phase.name}/{name}"] = time.perf_counter() - t0
    return timings
