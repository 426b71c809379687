"""Schedules: the nightly sweep of changed datasets, and the optional weekly retraining."""

import dagster as dg

from nnsam2_assets.defs.jobs import NEW_DATA_SELECTION, refinement_job
from nnsam2_assets.defs.metadata import latest_metadata
from nnsam2_assets.defs.partitions import datasets_partitions
from nnsam2_assets.defs.resources import NnsamStorage
from nnsam2_assets.defs.sensors import scan_data_root, selection_for


@dg.schedule(
    name="nightly_sweep_schedule",
    cron_schedule="0 2 * * *",
    target=NEW_DATA_SELECTION,
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Nightly: reruns any registered dataset whose files changed since its last ingest (missed by "
    "the sensor, e.g. while the daemon was down). Unchanged scans are cached, so a sweep costs only changes.",
)
def nightly_sweep_schedule(context: dg.ScheduleEvaluationContext, storage: NnsamStorage):
    current, _ = scan_data_root(storage)
    known = set(context.instance.get_dynamic_partitions(datasets_partitions.name))
    # one key per night: a dataset put back as it was on an earlier night is swept again
    night = f":{context.scheduled_execution_time:%Y-%m-%d}" if context.scheduled_execution_time else ""
    requests = []
    for name in sorted(set(current) & known):
        last = latest_metadata(context.instance, "scans", name).get("input_fingerprint")
        if last != current[name] and not _in_flight(context.instance, name):
            requests.append(
                dg.RunRequest(
                    partition_key=name,
                    run_key=f"sweep:{name}:{current[name]}{night}",
                    asset_selection=selection_for(storage),
                )
            )
    return requests or dg.SkipReason("every registered dataset is up to date or has a run under way")


IN_FLIGHT = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
]


def _in_flight(instance: dg.DagsterInstance, dataset: str) -> bool:
    """A run that ingests the dataset is queued or under way (the sensor's, from the evening): it will take the
    change, and a second one would only compete with it."""
    runs = instance.get_runs(filters=dg.RunsFilter(tags={"dagster/partition": dataset}, statuses=IN_FLIGHT))
    return any(run.asset_selection is None or dg.AssetKey("scans") in run.asset_selection for run in runs)


@dg.schedule(
    name="weekly_refinement_schedule",
    cron_schedule="0 3 * * 0",
    job=refinement_job,
    default_status=dg.DefaultScheduleStatus.STOPPED,
    description="Optional weekly retraining (off by default: models train on demand, never per new scan).",
)
def weekly_refinement_schedule(context: dg.ScheduleEvaluationContext):
    return dg.RunRequest(run_key=f"refine:{context.scheduled_execution_time:%Y-%m-%d}")
