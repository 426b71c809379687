"""New data: the sensor that registers datasets and launches their runs, and the automation sensor.

One mechanism launches runs for new data: ``new_data_sensor``. It registers a new dataset folder as a
``datasets`` partition and requests one run per changed dataset (new dataset, new or changed scan, edited
annotation, a new, changed or removed correction, which it records first: ``refinement.corrections``),
keyed by the folder fingerprint and the dataset's request count, so a change is run exactly once. ``scans`` has no automation
condition of its own, so the automation sensor never launches a second run for the same data; it only
reacts to code-version bumps and to upstream materializations (e.g. a retrained stage-3 model).

A tick requests at most ``NNSAM2_MAX_RUNS_PER_TICK`` runs (default 2), whatever the instance's run limit:
on a fresh instance with many dataset folders, the rest follow on later ticks instead of a storm of runs.
"""

import json

import dagster as dg

from nnsam2_assets.core.layout import model_pointer
from nnsam2_assets.defs.ingest import place_corrections
from nnsam2_assets.defs.jobs import NEW_DATA_SELECTION
from nnsam2_assets.defs.partitions import datasets_partitions
from nnsam2_assets.defs.resources import (
    NnsamStorage,
    max_runs_per_tick,
    sensor_interval_s,
)
from nnsam2_assets.ingest.convention import (
    DatasetError,
    folder_fingerprint,
    list_dataset_folders,
    load_dataset,
)
from nnsam2_assets.pipeline import OUTPUTS, PER_DATASET
from nnsam2_assets.refinement.corrections import pending_corrections


def selection_for(storage: NnsamStorage) -> list[dg.AssetKey]:
    """Final masks and metrics only once a stage-3 model exists (inference only, never retraining)."""
    names = PER_DATASET + (OUTPUTS if model_pointer(storage.root, "stage3").exists() else [])
    return [dg.AssetKey(n) for n in names]


def _corrections_pending(storage: NnsamStorage, name: str) -> bool:
    try:
        return bool(pending_corrections(storage.dataset(name), storage.layout(name)))
    except Exception:  # an unreadable dataset is reported by scan_data_root
        return False


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
    minimum_interval_seconds=sensor_interval_s(),
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Registers new dataset folders as partitions and runs new or changed data once.",
)
def new_data_sensor(context: dg.SensorEvaluationContext, storage: NnsamStorage) -> dg.SensorResult:
    seen, requests_made = read_cursor(context.cursor)
    current, refused = scan_data_root(storage)
    for name, reason in refused.items():
        context.log.warning(f"dataset folder {name} refused: {reason}")
    known = set(context.instance.get_dynamic_partitions(datasets_partitions.name))
    new_partitions = sorted(set(current) - known)
    changed = sorted(name for name, fp in current.items() if seen.get(name) != fp)
    # a correction dropped before its dataset's first run ended is still unrecorded once the folder is seen
    changed += sorted(
        name for name in set(current) & known - set(changed) if _corrections_pending(storage, name)
    )
    requested = changed[: max_runs_per_tick()]
    if len(changed) > len(requested):
        context.log.info(f"{len(changed) - len(requested)} changed datasets wait for the next tick")
    # the cursor records only what was requested, so the datasets left over are requested on later ticks;
    # a folder missing for a tick (an unmounted share) keeps its entry, or its return would run it again
    fingerprints = {**seen, **{name: current[name] for name in requested}}
    requests_made.update({name: requests_made.get(name, 0) + 1 for name in requested})
    selection = selection_for(storage)
    run_keys = {}
    for name in requested:
        # the daemon skips a run key it has seen: the request's number keeps a dataset put back as it was
        # (fingerprint A, then B, then A again) from being skipped as A's first run
        run_keys[name] = f"{name}:{current[name]}:{requests_made[name]}"
        if name not in known:  # a new dataset has no scans ingested yet, hence nothing corrected
            continue
        recorded = place_corrections(context.instance, context.log, storage, name)
        if recorded is not None and recorded.scans:
            run_keys[name] += ":" + recorded.key
    return dg.SensorResult(
        dynamic_partitions_requests=[datasets_partitions.build_add_request(new_partitions)]
        if new_partitions
        else [],
        run_requests=[
            dg.RunRequest(partition_key=name, run_key=run_keys[name], asset_selection=selection)
            for name in requested
        ],
        cursor=json.dumps({"fingerprints": fingerprints, "requests": requests_made}, sort_keys=True),
    )


def read_cursor(cursor: str | None) -> tuple[dict[str, str], dict[str, int]]:
    """The sensor's cursor: each dataset's fingerprint when last requested, and how many runs it requested.
    A cursor written before the counts is the fingerprints alone."""
    state = json.loads(cursor) if cursor else {}
    if isinstance(state.get("fingerprints"), dict):
        return dict(state["fingerprints"]), {name: int(n) for name, n in state.get("requests", {}).items()}
    return state, {}


automation_sensor = dg.AutomationConditionSensorDefinition(
    "nnsam2_automation_sensor",
    target=dg.AssetSelection.all(),
    default_status=dg.DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=30,
)
