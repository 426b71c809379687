"""New data: the sensor that registers datasets and launches their runs, and the nightly sweep.

One mechanism launches runs for new data: ``new_data_sensor``. It registers a new dataset folder as a
``datasets`` partition and requests one run per changed dataset (new dataset, new or changed scan, edited
annotation), keyed by the folder fingerprint so a change is run exactly once. ``scans`` has no automation
condition of its own, so the automation sensor never launches a second run for the same data; it only
reacts to code-version bumps and to upstream materializations (e.g. a retrained stage-3 model).
"""

import json

import dagster as dg

from nnsam2_assets.defs.common import latest_metadata
from nnsam2_assets.defs.partitions import datasets_partitions
from nnsam2_assets.defs.resources import NnsamStorage
from nnsam2_assets.defs.selections import OUTPUTS, PER_DATASET
from nnsam2_assets.lib.dataset import DatasetError, folder_fingerprint, list_dataset_folders, load_dataset
from nnsam2_assets.lib.layout import model_root

NEW_DATA_SELECTION = dg.AssetSelection.assets(*PER_DATASET, *OUTPUTS)


def _selection_for(storage: NnsamStorage) -> list[dg.AssetKey]:
    """Final masks and metrics only once a stage-3 model exists (inference only, never retraining)."""
    names = PER_DATASET + (OUTPUTS if (model_root(storage.root, "stage3") / "current.json").exists() else [])
    return [dg.AssetKey(n) for n in names]


def scan_data_root(storage: NnsamStorage) -> tuple[dict[str, str], dict[str, str]]:
    """Fingerprints of valid dataset folders, and the reasons invalid ones are refused."""
    valid, refused = {}, {}
    for folder in list_dataset_folders(storage.data):
        try:
            load_dataset(storage.data, folder.name)
        except (DatasetError, ValueError) as exc:
            refused[folder.name] = str(exc)
            continue
        valid[folder.name] = folder_fingerprint(folder)
    return valid, refused


@dg.sensor(
    name="new_data_sensor",
    target=NEW_DATA_SELECTION,
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Registers new dataset folders as partitions and runs new or changed data once.",
)
def new_data_sensor(context: dg.SensorEvaluationContext, storage: NnsamStorage) -> dg.SensorResult:
    seen = json.loads(context.cursor) if context.cursor else {}
    current, refused = scan_data_root(storage)
    for name, reason in refused.items():
        context.log.warning(f"dataset folder {name} refused: {reason}")
    known = set(context.instance.get_dynamic_partitions(datasets_partitions.name))
    new_partitions = sorted(set(current) - known)
    changed = sorted(name for name, fp in current.items() if seen.get(name) != fp)
    selection = _selection_for(storage)
    return dg.SensorResult(
        dynamic_partitions_requests=[datasets_partitions.build_add_request(new_partitions)]
        if new_partitions
        else [],
        run_requests=[
            dg.RunRequest(partition_key=name, run_key=f"{name}:{current[name]}", asset_selection=selection)
            for name in changed
        ],
        cursor=json.dumps(current, sort_keys=True),
    )


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
    requests = []
    for name in sorted(set(current) & known):
        last = latest_metadata(context.instance, "scans", name).get("input_fingerprint")
        if last != current[name]:
            requests.append(
                dg.RunRequest(
                    partition_key=name,
                    run_key=f"sweep:{name}:{current[name]}",
                    asset_selection=_selection_for(storage),
                )
            )
    return requests or dg.SkipReason("every registered dataset is up to date")


refinement_job = dg.define_asset_job(
    "refinement_job",
    selection=dg.AssetSelection.assets("nnunet_stage1", "nnunet_stage2", "nnunet_stage3"),
    description="Train the three pooled nnU-Net stages once each (each predicts every scan).",
)


@dg.schedule(
    name="weekly_refinement_schedule",
    cron_schedule="0 3 * * 0",
    job=refinement_job,
    default_status=dg.DefaultScheduleStatus.STOPPED,
    description="Optional weekly retraining (off by default: models train on demand, never per new scan).",
)
def weekly_refinement_schedule(context: dg.ScheduleEvaluationContext):
    return dg.RunRequest(run_key=f"refine:{context.scheduled_execution_time:%Y-%m-%d}")


automation_sensor = dg.AutomationConditionSensorDefinition(
    "nnsam2_automation_sensor",
    target=dg.AssetSelection.all(),
    default_status=dg.DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=30,
)


def all_sensors() -> list:
    return [new_data_sensor, automation_sensor]


def all_schedules() -> list:
    return [nightly_sweep_schedule, weekly_refinement_schedule]


def all_jobs() -> list:
    return [refinement_job]
