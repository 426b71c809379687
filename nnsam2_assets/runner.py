"""Materialize a cohort through Dagster in the right order (used by ``nnsam2 run``/``demo``, tests, benchmarks).

The order and the phases are ``pipeline.PHASES``; each phase is one in-process Dagster run per dataset
(or one run for the pooled models).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import dagster as dg

from nnsam2_assets.definitions import defs
from nnsam2_assets.defs.partitions import datasets_partitions
from nnsam2_assets.defs.resources import resolved
from nnsam2_assets.ingest.convention import (
    DatasetError,
    list_dataset_folders,
    load_dataset,
    validate_dataset_key,
)
from nnsam2_assets.pipeline import PHASES, Phase, default_phases

# the job name ``dg.materialize`` gives its runs (so runs look the same whichever way they were launched)
EPHEMERAL_JOB = "__ephemeral_asset_job__"


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


def _run(
    assets, selection, instance, resources, partition_key=None, run_config=None, tags=None, loggers=None
):
    """One in-process run. Ctrl-C during a step ends the run as a failure and Dagster returns normally: it is
    raised again here as ``KeyboardInterrupt``, so the command stops instead of going on with the next
    dataset and the models (hours of training)."""
    result = _execute(assets, selection, instance, resources, partition_key, run_config, tags, loggers)
    if interrupted(result):
        raise KeyboardInterrupt
    return result


def interrupted(result: dg.ExecuteInProcessResult) -> bool:
    """Whether a step of the run failed because the run was interrupted (Ctrl-C, SIGINT)."""
    for event in result.all_events:
        err = event.step_failure_data.error if event.is_step_failure and event.step_failure_data else None
        while err is not None:
            if err.cls_name in ("DagsterExecutionInterruptedError", "KeyboardInterrupt"):
                return True
            err = err.cause
    return False


def _execute(assets, selection, instance, resources, partition_key, run_config, tags, loggers):
    if not loggers:
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
    # dg.materialize with the run's loggers replaced (it takes none): the same in-process execution. A
    # run instantiates only the loggers its run config names (none named: Dagster's console logger)
    run_config = dict(run_config or {})
    run_config["loggers"] = {**{key: {} for key in loggers}, **run_config.get("loggers", {})}
    job_defs = dg.Definitions(
        jobs=[dg.define_asset_job(EPHEMERAL_JOB, selection=selection)],
        assets=assets,
        resources=resources,
        loggers=loggers,
    )
    return job_defs.resolve_job_def(EPHEMERAL_JOB).execute_in_process(
        run_config=run_config,
        instance=instance,
        partition_key=partition_key,
        raise_on_error=False,
        tags=tags or {},
    )


def materialize_cohort(
    instance: dg.DagsterInstance,
    datasets: Iterable[str],
    assets: list | None = None,
    resources: dict | None = None,
    run_config: dict | None = None,
    stages: tuple[str, ...] | None = None,
    progress: Callable[[str], None] = print,
    loggers: dict[str, dg.LoggerDefinition] | None = None,
    on_result: Callable[[Phase, str | None, dg.ExecuteInProcessResult], None] | None = None,
) -> CohortRun:
    """Run the ``stages`` (names of ``pipeline.PHASES``) in pipeline order: a per-dataset phase runs once per
    dataset that has not failed so far, a pooled phase once; a failed pooled phase ends the cohort run.

    ``loggers`` replace Dagster's console logger in every run; ``on_result(phase, dataset or None, result)``
    is called after each run. ``stages=None`` runs ``pipeline.default_phases`` for the refinement resource.
    """
    if assets is None or resources is None:
        loaded = defs()
        assets = assets if assets is not None else list(loaded.assets or [])
        resources = resources if resources is not None else dict(loaded.resources or {})
    if stages is None:
        refinement = resources.get("refinement")
        sampling = resolved(refinement).foreground_sampling if refinement is not None else ""
        stages = default_phases(sampling == "supervoxels")
    ok = list(datasets)
    out = CohortRun()
    for phase in PHASES:
        if phase.name not in stages:
            continue
        if not phase.per_dataset:
            if not ok:
                continue
            t0 = time.perf_counter()
            progress(f"[{phase.name}] {', '.join(phase.assets)} pooled from {', '.join(ok)}")
            res = _run(assets, phase.assets, instance, resources, None, run_config, loggers=loggers)
            out.timings[phase.name] = time.perf_counter() - t0
            out.run_ids.append(res.run_id)
            if on_result is not None:
                on_result(phase, None, res)
            if not res.success:
                out.failed[phase.name] = failure_message(res)
                progress(f"[{phase.name}] FAILED: {out.failed[phase.name]}")
                return out
            continue
        for name in list(ok):
            t0 = time.perf_counter()
            progress(f"[{name}] {', '.join(phase.assets)}")
            res = _run(assets, phase.assets, instance, resources, name, run_config, loggers=loggers)
            out.timings[f"{phase.name}/{name}"] = time.perf_counter() - t0
            out.run_ids.append(res.run_id)
            if on_result is not None:
                on_result(phase, name, res)
            if not res.success:
                # the first phase's failures are keyed by dataset (a dataset that never got going)
                key = name if phase is PHASES[0] else f"{phase.name}/{name}"
                out.failed[key] = failure_message(res)
                progress(f"[{name}] {phase.name} FAILED: {out.failed[key]}")
                ok.remove(name)
    return out


def failure_message(result: dg.ExecuteInProcessResult) -> str:
    for event in result.all_events:
        if event.is_step_failure and event.step_failure_data and event.step_failure_data.error:
            err = event.step_failure_data.error
            while err.cause is not None and err.cls_name in ("DagsterExecutionStepExecutionError",):
                err = err.cause
            return f"{event.step_key}: {err.message.strip().splitlines()[-1][:500]}"
    return "run failed"
