"""End to end through the real processes: dagster-webserver + dagster-daemon, the GraphQL API, headless chromium.

A tiny dataset dropped into the data root is registered by new_data_sensor (daemon), its ingest is launched
through GraphQL, and the UI renders the assets. Screenshots land in test-artifacts/ (gitignored).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import pytest
import requests
from dagster_graphql import DagsterGraphQLClient, DagsterGraphQLClientError

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


def _stop(proc: subprocess.Popen, timeout: float = 15) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=timeout)
    with contextlib.suppress(ProcessLookupError):  # the group: code servers and run workers it started
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)


def _wait(predicate, timeout: float, what: str, interval: float = 1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


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
    }
    (root / "nnsam2" / "data").mkdir(parents=True)
    # create the sqlite storages once, here: webserver and daemon migrating a fresh home at the same moment
    # can race (alembic "more than one head")
    dg.DagsterInstance.from_config(str(home)).dispose()
    commands = {
        "webserver": [
            str(BIN / "dagster-webserver"),
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
            "-w",
            "workspace.yaml",
        ],
        "daemon": [str(BIN / "dagster-daemon"), "run", "-w", "workspace.yaml"],
    }
    procs: list[subprocess.Popen] = []
    try:
        for name, cmd in commands.items():
            out = open(logs / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
            procs.append(
                subprocess.Popen(
                    cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
                )
            )
        url = f"http://127.0.0.1:{port}"

        def up():
            for p in procs:
                assert p.poll() is None, f"{p.args[0]} exited early: see {logs}"
            try:
                return requests.get(f"{url}/server_info", timeout=2).ok
            except requests.ConnectionError:
                return False

        _wait(up, 90, "dagster-webserver /server_info")
        yield Stack(url, port, home, root / "nnsam2" / "data", logs)
    finally:
        for p in reversed(procs):
            _stop(p)
        if ARTIFACTS.exists():
            for name in ("webserver", "daemon"):
                if (logs / f"{name}.log").exists():
                    shutil.copy(logs / f"{name}.log", ARTIFACTS / f"{name}.log")


def _graphql(stack: Stack, query: str, variables: dict | None = None) -> dict:
    r = requests.post(f"{stack.url}/graphql", json={"query": query, "variables": variables or {}}, timeout=30)
    r.raise_for_status()
    body = r.json()
    assert "errors" not in body, body
    return body["data"]


def _chromium(url: str, screenshot: Path, tmp: Path) -> str:
    chromium = shutil.which("chromium")
    assert chromium, "chromium not installed: run `bash .ci/bootstrap.sh --system`"
    base = [
        chromium,
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--hide-scrollbars",
        "--window-size=1600,1000",
        f"--user-data-dir={tmp}",
        "--virtual-time-budget=20000",
    ]
    kw = {"capture_output": True, "text": True, "timeout": 90, "start_new_session": True}
    dom = subprocess.run([*base, "--dump-dom", url], **kw)
    assert dom.returncode == 0, dom.stderr[-2000:]
    shot = subprocess.run([*base, f"--screenshot={screenshot}", url], **kw)
    assert shot.returncode == 0 and screenshot.exists() and screenshot.stat().st_size > 10_000, shot.stderr[
        -2000:
    ]
    return dom.stdout


def test_sensor_registers_dataset_graphql_run_and_ui_renders(stack: Stack, tmp_path: Path):
    instance = dg.DagsterInstance.from_config(str(stack.home))
    try:
        # 1. drop a dataset: the daemon's new_data_sensor registers it as a partition and launches ONE run
        write_tiny(stack.data_root, "webtiny", n_scans=2)
        _wait(
            lambda: "webtiny" in instance.get_dynamic_partitions("datasets"),
            120,
            "new_data_sensor to register the partition",
            interval=2,
        )

        def sensor_runs():
            return instance.get_runs(
                dg.RunsFilter(tags={"dagster/sensor_name": "new_data_sensor", "dagster/partition": "webtiny"})
            )

        _wait(sensor_runs, 60, "the sensor's run for webtiny", interval=2)

        # 2. launch ingest for that partition through the GraphQL API and wait for it
        client = DagsterGraphQLClient("127.0.0.1", port_number=stack.port)
        run_id = client.submit_job_execution(
            "dataset_job",
            repository_location_name="nnsam2",
            tags={"dagster/partition": "webtiny"},
            asset_selection=[[a] for a in INGEST],
        )

        def finished():
            try:
                status = client.get_run_status(run_id)
            except DagsterGraphQLClientError:
                return None
            return status if status.value in ("SUCCESS", "FAILURE", "CANCELED") else None

        status = _wait(finished, 180, f"run {run_id}", interval=2)
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
