"""Materialize a cohort through Dagster in the right order (used by ``nnsam2 demo``, tests and benchmarks).

Per dataset: ingest -> frames -> propagation -> pseudo-labels (one run per partition, so one bad dataset
never sinks the others). Then the pooled models, each trained once (one run). Then per dataset: final masks
and metrics with the current stage-3 model.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import dagster as dg

from nnsam2_assets.defs.partitions import datasets_partitions
from nnsam2_assets.defs.selections import MODELS, OUTPUTS, PER_DATASET  # noqa: F401 (re-exported)
from nnsam2_assets.lib.dataset import DatasetError, list_dataset_folders, load_dataset, validate_dataset_key


@dataclass
class CohortRun:
    timings: dict[str, float] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    run_ids: list[str] = field(default_factory=list)


def register_datasets(instance: dg.DagsterInstance, data_root: Path) -> tuple[list[str], dict[str, str]]:
    """Add every valid dataset folder as a ``datasets`` partition; report the invalid ones with the reason."""
    added, rejected = [], {}
    known = set(instance.get_dynamic_partitions(datasets_partitions.name))
    for folder in list_dataset_folders(data_root):
        try:
            validate_dataset_key(folder.name)
            load_dataset(data_root, folder.name)
        except (DatasetError, ValueError) as exc:
            rejected[folder.name] = str(exc)
            continue
        if folder.name not in known:
            added.append(folder.name)
    if added:
        instance.add_dynamic_partitions(datasets_partitions.name, added)
    return added, rejected


def _run(assets, selection, instance, resources, partition_key=None, run_config=None, tags=None):
    return dg.materialize(
        assets,
        selection=selection,
        partition_key=partition_key,
        instance=instance,
        resources=resources,
        run_config=run_config or {},
        raise_on_error=False,
        tags=tags or {},
    )


def materialize_cohort(
    instance: dg.DagsterInstance,
    datasets: Iterable[str],
    assets: list | None = None,
    resources: dict | None = None,
    run_config: dict | None = None,
    stages: tuple[str, ...] = ("datasets", "models", "outputs"),
    progress: Callable[[str], None] = print,
) -> CohortRun:
    from nnsam2_assets.definitions import all_assets, default_resources

    assets = assets if assets is not None else all_assets()
    resources = resources if resources is not None else default_resources()
    datasets = list(datasets)
    out = CohortRun()
    ok = []
    if "datasets" in stages:
        for name in datasets:
            t0 = time.perf_counter()
            progress(f"[{name}] ingest, frames, propagation, pseudo-labels")
            res = _run(assets, PER_DATASET, instance, resources, name, run_config)
            out.timings[f"datasets/{name}"] = time.perf_counter() - t0
            out.run_ids.append(res.run_id)
            if res.success:
                ok.append(name)
            else:
                out.failed[name] = _failure(res)
                progress(f"[{name}] FAILED: {out.failed[name]}")
    else:
        ok = datasets
    if "models" in stages and ok:
        t0 = time.perf_counter()
        progress(f"training nnU-Net stages 1-3 on pseudo-labels pooled from {', '.join(ok)}")
        res = _run(assets, MODELS, instance, resources, None, run_config)
        out.timings["models"] = time.perf_counter() - t0
        out.run_ids.append(res.run_id)
        if not res.success:
            out.failed["models"] = _failure(res)
            progress(f"[models] FAILED: {out.failed['models']}")
            return out
    if "outputs" in stages:
        for name in ok:
            t0 = time.perf_counter()
            progress(f"[{name}] final masks and metrics")
            res = _run(assets, OUTPUTS, instance, resources, name, run_config)
            out.timings[f"outputs/{name}"] = time.perf_counter() - t0
            out.run_ids.append(res.run_id)
            if not res.success:
                out.failed[f"outputs/{name}"] = _failure(res)
                progress(f"[{name}] outputs FAILED: {out.failed[f'outputs/{name}']}")
    return out


def _failure(result: dg.ExecuteInProcessResult) -> str:
    for event in result.all_events:
        if event.is_step_failure and event.step_failure_data and event.step_failure_data.error:
            err = event.step_failure_data.error
            while err.cause is not None and err.cls_name in ("DagsterExecutionStepExecutionError",):
                err = err.cause
            return f"{event.step_key}: {err.message.strip().splitlines()[-1][:500]}"
    return "run failed"
