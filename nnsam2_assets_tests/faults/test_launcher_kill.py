"""kill -9 of the process that launched a run (``dagster job execute``) while its steps are in flight.

Every process it started must end, the run must end FAILED in the instance rather than stay STARTED, and
a rerun must complete with the same outputs as an uninterrupted run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import dagster as dg
import pandas as pd

from nnsam2_assets.core import layout
from nnsam2_assets.core.lifecycle import alive, descendants
from nnsam2_assets.core.storage import sha256_file
from nnsam2_assets.ingest.scans import read_manifest
from nnsam2_assets.pipeline import PER_DATASET
from nnsam2_assets.testing.cli_runs import cli_env, dataset_job_command, local_home
from nnsam2_assets.testing.cohorts import write_tiny
from nnsam2_assets.testing.direct import STEPS, DirectRun
from nnsam2_assets.testing.waits import wait_for

NAME = "tiny"
IN_FLIGHT = "propagated_masks"  # a step that runs for seconds, after its resources were set up


def _step_started(instance: dg.DagsterInstance, step: str) -> bool:
    runs = instance.get_runs()
    if not runs:
        return False
    events = instance.all_logs(runs[0].run_id, of_type=dg.DagsterEventType.STEP_START)
    return any(e.step_key == step for e in events)


def _execute(env: dict) -> subprocess.Popen:
    return subprocess.Popen(
        dataset_job_command(NAME),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _outputs(data: Path, store: Path) -> dict:
    lay = layout.DatasetLayout(store, NAME)
    manifest = read_manifest(lay).drop(columns=["source"])
    ok = sorted(manifest.index[manifest.status == "ok"])
    return {
        "manifest": manifest.sort_index().sort_index(axis=1),
        "selection": pd.read_parquet(lay.pseudo_selection)
        .sort_values(["scan", "slice"])
        .reset_index(drop=True),
        "masks": {s: sha256_file(lay.masks(s)) for s in ok},
        "pseudo": {s: sha256_file(lay.pseudo_label(s)) for s in ok},
    }


def test_kill9_of_the_launcher_leaves_no_process_and_a_failed_run(tmp_path):
    data, store, home = tmp_path / "data", tmp_path / "store", tmp_path / "dagster_home"
    write_tiny(data, NAME, n_scans=3)
    local_home(home, [NAME])
    env = cli_env(home, data, store, tmp_path)

    launcher = _execute(env)
    seen: set[int] = set()
    with dg.DagsterInstance.from_config(str(home)) as instance:
        while not _step_started(instance, IN_FLIGHT):
            assert launcher.poll() is None, f"the run ended before {IN_FLIGHT} was in flight"
            seen |= descendants(launcher.pid)
            time.sleep(0.2)
    seen |= descendants(launcher.pid)
    assert seen, "no step worker was running"
    os.kill(launcher.pid, signal.SIGKILL)
    launcher.wait()
    # the workers poll their launcher every 0.5 s; waiting for them to go is the claim, not how fast
    wait_for(lambda: not alive(seen), f"exit of the killed run's processes {sorted(alive(seen))}", 0.5)

    with dg.DagsterInstance.from_config(str(home)) as instance:
        (run,) = instance.get_runs()
        assert run.status == dg.DagsterRunStatus.FAILURE, run.status
        failure = instance.all_logs(run.run_id, of_type=dg.DagsterEventType.RUN_FAILURE)
        assert any("the process that launched this run died" in (e.message or "") for e in failure)

    rerun = _execute(env)
    assert rerun.wait() == 0
    reference = tmp_path / "reference"
    direct = DirectRun(data, reference, [NAME])
    for asset in PER_DATASET:
        STEPS[asset](direct, NAME)
    got, want = _outputs(data, store), _outputs(data, reference)
    pd.testing.assert_frame_equal(
        got["manifest"].drop(columns=["source_hash"]), want["manifest"].drop(columns=["source_hash"])
    )
    pd.testing.assert_frame_equal(got["selection"], want["selection"])
    assert got["masks"] == want["masks"] and got["pseudo"] == want["pseudo"]
