"""new_data_sensor and nightly_sweep_schedule, evaluated against a real (temporary) instance."""

from __future__ import annotations

import datetime
import json
import shutil
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest

from nnsam2_assets.core.layout import model_root
from nnsam2_assets.definitions import all_assets
from nnsam2_assets.defs.resources import NnsamStorage, build_resources
from nnsam2_assets.defs.schedules import nightly_sweep_schedule
from nnsam2_assets.defs.sensors import new_data_sensor, read_cursor
from nnsam2_assets.ingest.convention import folder_fingerprint
from nnsam2_assets.pipeline import OUTPUTS, PER_DATASET
from nnsam2_assets_tests.ops import write_tiny

PER_DATASET_KEYS = [dg.AssetKey(n) for n in PER_DATASET]


@pytest.fixture
def env(tmp_path: Path):
    data, storage_root = tmp_path / "data", tmp_path / "storage"
    data.mkdir()
    storage = NnsamStorage(data_root=str(data), storage_root=str(storage_root))
    with dg.instance_for_test() as instance:
        yield instance, data, storage


def _tick(instance, storage, cursor=None) -> dg.SensorResult:
    ctx = dg.build_sensor_context(instance=instance, resources={"storage": storage}, cursor=cursor)
    result = new_data_sensor(ctx)
    assert isinstance(result, dg.SensorResult)
    # what the daemon does with the result: add the partitions first, then keep the cursor
    for request in result.dynamic_partitions_requests or []:
        instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))
    return result


def _add_scan(folder: Path, new_id: str = "subj09") -> None:
    scans = folder / "scans"
    for part in ("water", "fat"):
        shutil.copy(scans / f"subj01_{part}.nii.gz", scans / f"{new_id}_{part}.nii.gz")
    row = pd.read_csv(folder / "regions.csv").query("scan == 'subj01'").iloc[0]
    with open(folder / "regions.csv", "a") as fh:
        fh.write(f"{new_id},{row.first_slice},{row.last_slice}\n")


def test_new_dataset_is_registered_and_run_once(env):
    instance, data, storage = env
    empty = _tick(instance, storage)
    assert not empty.run_requests and not empty.dynamic_partitions_requests

    folder = write_tiny(data, n_scans=2)
    first = _tick(instance, storage, empty.cursor)
    (add,) = first.dynamic_partitions_requests
    assert add.partitions_def_name == "datasets" and list(add.partition_keys) == ["tiny"]
    (run,) = first.run_requests
    assert run.partition_key == "tiny"
    assert run.run_key == f"tiny:{folder_fingerprint(folder)}:1"
    # no stage-3 model yet: the per-dataset chain only, never final masks or metrics
    assert list(run.asset_selection) == PER_DATASET_KEYS
    assert instance.get_dynamic_partitions("datasets") == ["tiny"]
    assert read_cursor(first.cursor) == ({"tiny": folder_fingerprint(folder)}, {"tiny": 1})

    again = _tick(instance, storage, first.cursor)
    assert not again.run_requests and not again.dynamic_partitions_requests


def test_new_scan_in_known_dataset_requests_only_that_dataset(env):
    instance, data, storage = env
    tiny = write_tiny(data, "tiny", n_scans=2)
    write_tiny(data, "other", n_scans=2, seed=5)
    first = _tick(instance, storage)
    assert sorted(r.partition_key for r in first.run_requests) == ["other", "tiny"]
    assert list(first.dynamic_partitions_requests[0].partition_keys) == ["other", "tiny"]

    _add_scan(tiny)
    second = _tick(instance, storage, first.cursor)
    assert not second.dynamic_partitions_requests  # already a partition
    (run,) = second.run_requests
    assert run.partition_key == "tiny" and run.run_key == f"tiny:{folder_fingerprint(tiny)}:2"
    assert run.run_key not in {r.run_key for r in first.run_requests}  # a new key: the daemon runs it

    # once a stage-3 model exists, new data also gets final masks and metrics (inference only)
    current = model_root(storage.root, "stage3") / "current.json"
    current.parent.mkdir(parents=True, exist_ok=True)
    current.write_text("{}")
    _add_scan(tiny, "subj08")
    third = _tick(instance, storage, second.cursor)
    (run,) = third.run_requests
    assert run.partition_key == "tiny"
    assert list(run.asset_selection) == PER_DATASET_KEYS + [dg.AssetKey(n) for n in OUTPUTS]
    assert not _tick(instance, storage, third.cursor).run_requests


def test_invalid_folder_name_is_refused_and_logged(env, capfd):
    instance, data, storage = env
    write_tiny(data, "good", n_scans=2)
    shutil.copytree(data / "good", data / "Bad Name")
    result = _tick(instance, storage)
    logged = capfd.readouterr().err
    assert [r.partition_key for r in result.run_requests] == ["good"]
    assert list(result.dynamic_partitions_requests[0].partition_keys) == ["good"]
    assert instance.get_dynamic_partitions("datasets") == ["good"]
    assert "Bad Name" not in read_cursor(result.cursor)[0]
    assert "dataset folder Bad Name refused: invalid dataset name 'Bad Name'" in logged
    assert "WARNING" in logged


def test_nightly_sweep_requests_only_changed_datasets(env, tmp_path):
    instance, data, storage = env
    tiny = write_tiny(data, "tiny", n_scans=2)
    write_tiny(data, "other", n_scans=2, seed=5)
    instance.add_dynamic_partitions("datasets", ["other", "tiny"])
    resources = build_resources(data, Path(storage.storage_root))
    for name in ("other", "tiny"):
        result = dg.materialize(
            all_assets(), selection=["scans"], partition_key=name, instance=instance, resources=resources
        )
        assert result.success

    def sweep():
        night = datetime.datetime(2026, 12, 7, 2, tzinfo=datetime.UTC)
        with dg.build_schedule_context(
            instance=instance, resources={"storage": storage}, scheduled_execution_time=night
        ) as ctx:
            return nightly_sweep_schedule(ctx)

    skipped = sweep()
    assert isinstance(skipped, dg.SkipReason), skipped
    assert "up to date" in skipped.skip_message

    _add_scan(tiny)  # a change the sensor missed (e.g. daemon down)
    (run,) = sweep()
    assert run.partition_key == "tiny"
    assert run.run_key == f"sweep:tiny:{folder_fingerprint(tiny)}:2026-12-07"  # one key per night
    assert list(run.asset_selection) == PER_DATASET_KEYS

    # the sensor's run of the change is still under way at 02:00: the sweep leaves it to that run
    running = dg.DagsterRun(
        job_name="__ASSET_JOB",
        run_id="0" * 32,
        status=dg.DagsterRunStatus.STARTED,
        asset_selection=frozenset(PER_DATASET_KEYS),
        tags={"dagster/partition": "tiny"},
    )
    instance.add_run(running)
    assert isinstance(sweep(), dg.SkipReason)
    instance.report_run_failed(running)
    assert len(sweep()) == 1

    # once ingest has seen the change, the sweep is quiet again
    assert dg.materialize(
        all_assets(), selection=["scans"], partition_key="tiny", instance=instance, resources=resources
    ).success
    assert isinstance(sweep(), dg.SkipReason)


def test_a_tick_requests_at_most_two_runs_and_the_rest_follow(env):
    """Thirty-odd folders at start-up on an instance without a run limit must not become a storm of runs."""
    instance, data, storage = env
    template = write_tiny(data, "ds0", n_scans=2)
    for i in range(1, 5):
        shutil.copytree(template, data / f"ds{i}")
    requested, cursor = [], None
    for _ in range(3):
        result = _tick(instance, storage, cursor)
        assert len(result.run_requests) <= 2
        requested.append(sorted(r.partition_key for r in result.run_requests))
        cursor = result.cursor
    assert requested == [["ds0", "ds1"], ["ds2", "ds3"], ["ds4"]]
    assert instance.get_dynamic_partitions("datasets") == [f"ds{i}" for i in range(5)]
    assert not _tick(instance, storage, cursor).run_requests


def test_a_dataset_put_back_as_it_was_runs_again_under_a_new_key(env):
    """The daemon skips a run key it has seen: A, then B, then A again had been skipped for good."""
    instance, data, storage = env
    tiny = write_tiny(data, "tiny", n_scans=2)
    first = _tick(instance, storage)
    kept = shutil.copy2(tiny / "regions.csv", data / "regions.kept")
    _add_scan(tiny)
    second = _tick(instance, storage, first.cursor)
    for part in ("water", "fat"):  # the user takes the new scan out again, and the table back as it was
        (tiny / "scans" / f"subj09_{part}.nii.gz").unlink()
    shutil.copy2(kept, tiny / "regions.csv")
    third = _tick(instance, storage, second.cursor)
    (run,) = third.run_requests
    assert run.partition_key == "tiny"
    assert read_cursor(third.cursor)[0]["tiny"] == read_cursor(first.cursor)[0]["tiny"]  # A again
    keys = [r.run_key for r in (*first.run_requests, *second.run_requests, run)]
    assert len(set(keys)) == 3
    assert not _tick(instance, storage, third.cursor).run_requests


def test_a_data_root_missing_for_a_tick_keeps_the_cursor(env):
    """An unmounted share for one tick had emptied the cursor, and every dataset ran again on its return."""
    instance, data, storage = env
    write_tiny(data, "tiny", n_scans=2)
    first = _tick(instance, storage)
    data.rename(data.with_name("unmounted"))
    gone = _tick(instance, storage, first.cursor)
    assert not gone.run_requests and read_cursor(gone.cursor) == read_cursor(first.cursor)
    data.with_name("unmounted").rename(data)
    assert not _tick(instance, storage, gone.cursor).run_requests


def test_a_cursor_from_before_the_request_counts_is_read(env):
    instance, data, storage = env
    tiny = write_tiny(data, "tiny", n_scans=2)
    instance.add_dynamic_partitions("datasets", ["tiny"])
    old = json.dumps({"tiny": folder_fingerprint(tiny)})
    assert not _tick(instance, storage, old).run_requests
    _add_scan(tiny)
    (run,) = _tick(instance, storage, old).run_requests
    assert run.run_key == f"tiny:{folder_fingerprint(tiny)}:1"
