"""The direct side of the step fixed-cost row (``bench.overhead.bench_cli_overhead``): the per-dataset chain's
domain calls in a fresh process that never imports Dagster, so that CLI minus direct holds all of Dagster's
cost (``nnsam2_assets.testing.direct`` builds its settings from the Dagster resources, which would put the
import of Dagster on the direct side too). The registration backend, as a default run without SAM2 uses.

Run as ``python -m bench.direct_chain DATASET`` with ``NNSAM2_DATA_ROOT`` and ``NNSAM2_STORAGE_ROOT`` set."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from nnsam2_assets.core.layout import DATA_ROOT_ENV, STORAGE_ROOT_ENV, DatasetLayout
from nnsam2_assets.ingest import annotation, ranking
from nnsam2_assets.ingest.convention import load_dataset
from nnsam2_assets.ingest.scans import ingest_scans
from nnsam2_assets.pipeline import PER_DATASET
from nnsam2_assets.propagation.backends import build_propagator
from nnsam2_assets.propagation.parallel import default_workers
from nnsam2_assets.propagation.registration import BACKEND_IDENTITY
from nnsam2_assets.propagation.steps import propagate_masks
from nnsam2_assets.pseudolabels.selection import SelectionConfig
from nnsam2_assets.pseudolabels.steps import select_pseudo_labels


def run_chain(data_root: Path, storage_root: Path, dataset: str) -> None:
    spec, layout = load_dataset(data_root, dataset), DatasetLayout(storage_root, dataset)
    calls = {
        "scans": lambda: ingest_scans(spec, layout),
        "reference_annotation": lambda: annotation.write_reference_annotation(spec, layout),
        "reference_ranking": lambda: ranking.rank_dataset(spec, layout),
        "propagated_masks": lambda: propagate_masks(
            spec, layout, build_propagator, BACKEND_IDENTITY, workers=default_workers()
        ),
        "pseudo_labels": lambda: select_pseudo_labels(spec, layout, SelectionConfig()),
    }
    if set(calls) != set(PER_DATASET):
        raise RuntimeError(f"the chain is {PER_DATASET}; this direct run knows {sorted(calls)}")
    for asset in PER_DATASET:
        calls[asset]()


if __name__ == "__main__":
    run_chain(Path(os.environ[DATA_ROOT_ENV]), Path(os.environ[STORAGE_ROOT_ENV]), sys.argv[1])
