"""End to end through the real processes: ``nnsam2 ui`` (dagster dev: webserver, daemon, code server), the
GraphQL API, headless chromium.

A tiny dataset dropped into the data root is registered by new_data_sensor (daemon), its ingest is launched
through GraphQL, and the UI renders the assets. Screenshots land in test-artifacts/ (gitignored). Last, the
UI is stopped the README's way (Ctrl-C, i.e. SIGINT) while a run is in flight, and no process it started
may survive.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import pytest
import requests
from dagster_graphql import DagsterGraphQLClient, DagsterGraphQLClientError

from nnsam2_assets.core.lifecycle import alive, descendants
from nnsam2_assets.defs.resources import SENSOR_INTERVAL_ENV
from nnsam2_assets.testing.browser import chromium
from nnsam2_assets.testing.waits import wait_for
from nnsam2_assets_tests.ops import INGEST, REPO, free_port, write_tiny

ARTIFACTS = REPO / "test-artifacts"
BIN = Path(sys.executable).parent
INSTANCE_YAML = "telemetry:\n  enabled: false\nconcurrency:\n  pools:\n    default_limit: 1\n"


@dataclass
class Stack:
    url: str
    port: int
    home: Path
    data_root: Path
    logs: Path
    ui: subprocess.Popen


def _stop(ui: subprocess.Popen) -> None:
    """The README's stop: SIGINT (Ctrl-C) to ``nnsam2 ui``, which stops everything it started."""
    if ui.poll() is None:
        ui.send_signal(signal.SIGINT)
    ui.wait()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("webui")
    home, logs = root / "dagster_home", root / "logs"
    home.mkdir()
    logs.mkdir()
    (home / "dagster.yaml").write_text(INSTANCE_YAML)
    port = free_port()
    env = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "NNSAM2_HOME": str(root / "nnsam2"),
        "NNSAM2_DATA_ROOT": str(root / "nnsam2" / "data"),
        "NNSAM2_STORAGE_ROOT": str(root / "nnsam2" / "storage"),
        "PATH": f"{BIN}:{os.environ.get('PATH', '')}",
        SENSOR_INTERVAL_ENV: "3",  # the sensor's ticks, not the test's clock, pace these waits
    }
    (root / "nnsam2" / "data").mkdir(parents=True)
    # create the sqlite storages once, here: webserver and daemon migrating a fresh home at the same moment
    # can race (alembic "more than one head")
    dg.DagsterInstance.from_config(str(home)).dispose()
    out = open(logs / "ui.log", "w")  # noqa: SIM115 - closed with the process
    ui = subprocess.Popen(
        [sys.executable, "-m", "nnsam2_assets.cli", "ui", "--port", str(port), "--grace", "20"],
        cwd=REPO,
        env=env,
        stdout=out,
        stderr=subprocess.STDOUT,
    )
    try:
        url = f"http://127.0.0.1:{port}"

        def up():
            assert ui.poll() is None, f"nnsam2 ui exited early: see {logs}"
            try:
                return requests.get(f"{url}/server_info").ok
            except requests.RequestException:
                return False

        wait_for(up, "dagster-webserver /server_info")
        yield Stack(url, port, home, root / "nnsam2" / "data", logs, ui)
    finally:
        _stop(ui)
        if ARTIFACTS.exists() and (logs / "ui.log").exists():
            shutil.copy(logs / "ui.log", ARTIFACTS / "ui.log")


def _up(stack: Stack) -> bool:
    """The waits have no deadline: each fails at once if the UI's process tree is gone."""
    assert stack.ui.poll() is None, f"nnsam2 ui exited: see {stack.logs}"
    return True


def _graphql(stack: Stack, query: str, variables: dict | None = None) -> dict:
    r = requests.post(f"{stack.url}/graphql", json={"query": query, "variables": variables or {}})
    r.raise_for_status()
    body = r.json()
    assert "errors" not in body, body
    return body["data"]


def _chromium(url: str, screenshot: Path, tmp: Path) -> str:
    dom = chromium(url, tmp, "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    shot = chromium(url, tmp, f"--screenshot={screenshot}")
    assert shot.returncode == 0 and screenshot.exists() and screenshot.stat().st_size > 10_000, shot.stderr[
        -2000:
    ]
    return dom.stdout


def test_sensor_registers_dataset_graphql_run_and_ui_renders(stack: Stack, tmp_path: Path):
    instance = dg.DagsterInstance.from_config(str(stack.home))
    try:
        # 1. drop a dataset: the daemon's new_data_sensor registers it as a partition and launches ONE run
        write_tiny(stack.data_root, "webtiny", n_scans=2)
        wait_for(
            lambda: _up(stack) and "webtiny" in instance.get_dynamic_partitions("datasets"),
            "new_data_sensor to register the partition",
            interval=2,
        )

        def sensor_runs():
            _up(stack)
            return instance.get_runs(
                dg.RunsFilter(tags={"dagster/sensor_name": "new_data_sensor", "dagster/partition": "webtiny"})
            )

        wait_for(sensor_runs, "the sensor's run for webtiny", interval=2)

        # 2. launch ingest for that partition through the GraphQL API and wait for it
        client = DagsterGraphQLClient("127.0.0.1", port_number=stack.port)
        run_id = client.submit_job_execution(
            "dataset_job",
            repository_location_name="nnsam2",
            tags={"dagster/partition": "webtiny"},
            asset_selection=[[a] for a in INGEST],
        )

        def finished():
            _up(stack)
            try:
                status = client.get_run_status(run_id)
            except DagsterGraphQLClientError:
                return None
            return status if status.value in ("SUCCESS", "FAILURE", "CANCELED") else None

        status = wait_for(finished, f"run {run_id}", interval=2)
        assert status.value == "SUCCESS", f"run {run_id} ended {status}: see {stack.logs}"
        mats = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=dg.AssetKey("scans"), asset_partitions=["webtiny"]), limit=5
        ).records
        assert run_id in {m.run_id for m in mats}
        # exactly one sensor run for the new dataset (the cursor and run_key keep it from repeating)
        assert len(sensor_runs()) == 1
        run = sensor_runs()[0]
        assert run.tags["dagster/run_key"].startswith("webtiny:")
    finally:
        instance.dispose()

    # 3. the UI: dismiss the first-visit modal, then render the asset list and an asset page
    _graphql(stack, "mutation { setNuxSeen }")
    assert _graphql(stack, "{ shouldShowNux }")["shouldShowNux"] is False
    ARTIFACTS.mkdir(exist_ok=True)
    dom = _chromium(f"{stack.url}/assets", ARTIFACTS / "assets.png", tmp_path / "chrome1")
    for name in ("scans", "reference_annotation", "propagated_masks", "nnunet_stage3"):
        assert name in dom, f"{name} not rendered on /assets"
    dom = _chromium(f"{stack.url}/assets/scans", ARTIFACTS / "asset_scans.png", tmp_path / "chrome2")
    # the latest materialization's metadata for the new partition, and the sensor that feeds it
    for text in ("input_fingerprint", "n_ok", "webtiny", "new_data_sensor", "dataset_job"):
        assert text in dom, f"{text} not rendered on /assets/scans"


def test_ctrl_c_stops_every_process_while_a_run_is_in_flight(stack: Stack):
    """Runs last in this module: it stops the stack."""
    write_tiny(stack.data_root, "stoptiny", n_scans=3)
    instance = dg.DagsterInstance.from_config(str(stack.home))
    try:
        wait_for(
            lambda: _up(stack) and "stoptiny" in instance.get_dynamic_partitions("datasets"),
            "new_data_sensor to register stoptiny",
            interval=2,
        )
        client = DagsterGraphQLClient("127.0.0.1", port_number=stack.port)
        run_id = client.submit_job_execution(
            "dataset_job", repository_location_name="nnsam2", tags={"dagster/partition": "stoptiny"}
        )

        def in_flight() -> bool:
            steps = instance.all_logs(run_id, of_type=dg.DagsterEventType.STEP_START)
            return any(e.step_key == "propagated_masks" for e in steps)

        recorded: set[int] = set()

        def record_until_in_flight() -> bool:
            _up(stack)
            recorded.update(descendants(stack.ui.pid))
            return in_flight()

        wait_for(record_until_in_flight, f"run {run_id} to reach propagated_masks", interval=0.5)
        recorded |= descendants(stack.ui.pid)
    finally:
        instance.dispose()
    workers = [pid for pid in recorded if "multiprocessing" in _cmdline(pid) or "api" in _cmdline(pid)]
    assert workers, f"no run or step worker among {len(recorded)} processes"
    _stop(stack.ui)
    assert not alive(recorded), {pid: _cmdline(pid) for pid in alive(recorded)}


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""
