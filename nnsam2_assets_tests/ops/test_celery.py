"""The code location on a distributed engine: dagster-celery with a Redis broker on loopback, two CPU workers
and one GPU worker of concurrency 1, each started the README's way (``dagster-celery worker start``).

A dataset's per-dataset job, launched with ``dagster job execute``, runs every step in a worker process, its GPU
step (``propagated_masks``) on the GPU queue's worker and the others on the CPU queue, and writes the same
masks as the pipeline without Dagster. Every process the test started is stopped at the end.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest
import redis

from nnsam2_assets.core import layout
from nnsam2_assets.core.lifecycle import alive, descendants
from nnsam2_assets.core.storage import sha256_file
from nnsam2_assets.executors import CELERY_BROKER_ENV, CPU_QUEUE, EXECUTOR_ENV, GPU_QUEUE
from nnsam2_assets.ingest.scans import ok_scans
from nnsam2_assets.pipeline import PER_DATASET
from nnsam2_assets.testing.cli_runs import cli_env, dataset_job_command, local_home
from nnsam2_assets.testing.direct import DirectRun, run_direct
from nnsam2_assets.testing.waits import wait_for
from nnsam2_assets_tests.ops import REPO, free_port, write_tiny

BIN = Path(sys.executable).parent
NAME = "celerytiny"
GPU_STEPS = {"propagated_masks"}
WORKERS = {"cpu1": CPU_QUEUE, "cpu2": CPU_QUEUE, "gpu1": GPU_QUEUE}


def _answers(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[str]:
    port = free_port()
    server = subprocess.Popen(
        [shutil.which("redis-server") or "redis-server", "--port", str(port), "--bind", "127.0.0.1"]
        + ["--save", "", "--appendonly", "no", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    try:
        client = redis.Redis.from_url(url)
        wait_for(lambda: _answers(client) or server.poll() is not None, "redis-server to answer PING")
        assert server.poll() is None, "redis-server exited"
        yield url
    finally:
        server.terminate()
        server.wait()


def _stop(group: subprocess.Popen) -> None:
    """The README's stop: SIGTERM to the worker's process group, which Celery takes as a warm shutdown (finish
    the task in hand, then exit); the test waits until the wrapper, the worker and its pool are all gone."""
    members = {group.pid} | descendants(group.pid)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(group.pid, signal.SIGTERM)
    group.wait()
    wait_for(lambda: not alive(members), f"celery worker {group.pid} and its pool to exit", interval=0.2)


def _worker_of_each_step(instance: dg.DagsterInstance, run_id: str) -> dict[str, str]:
    """step -> the Celery worker's hostname, from the engine event each worker writes before the step."""
    out = {}
    for record in instance.all_logs(run_id, of_type=dg.DagsterEventType.ENGINE_EVENT):
        event = record.dagster_event
        metadata = event.event_specific_data.metadata if event and event.event_specific_data else {}
        if "Celery worker" in metadata:
            out[event.step_key] = metadata["Celery worker"].value
    return out


def test_a_dataset_job_runs_on_celery_workers_with_gpu_steps_on_their_own_queue(broker, tmp_path):
    data, storage, home, logs = (tmp_path / d for d in ("data", "storage", "dagster_home", "logs"))
    write_tiny(data, NAME, n_scans=2)
    logs.mkdir()
    local_home(home, [NAME], "telemetry:\n  enabled: false\n")
    env = {
        **cli_env(home, data, storage, tmp_path),
        EXECUTOR_ENV: "celery",
        CELERY_BROKER_ENV: broker,
        "PATH": f"{BIN}:{os.environ.get('PATH', '')}",
    }
    workers = {}
    recorded: set[int] = set()
    try:
        for name, queue in WORKERS.items():
            log = open(logs / f"{name}.log", "w")  # noqa: SIM115 - the worker holds it until it stops
            workers[name] = subprocess.Popen(
                [str(BIN / "dagster-celery"), "worker", "start", "-A", "dagster_celery.app"]
                + ["-y", str(REPO / "docker" / "celery-worker.yaml"), "-q", queue, "-n", name]
                + ["--", "--concurrency=1", "--pool=prefork"],
                env=env,
                cwd=REPO,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        run = subprocess.run(
            dataset_job_command(NAME),
            env=env,
            cwd=REPO,
            capture_output=True,
            text=True,
        )
        for group in workers.values():
            recorded |= {group.pid} | descendants(group.pid)
        assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
        with dg.DagsterInstance.from_config(str(home)) as instance:
            (record,) = instance.get_runs()
            assert record.status == dg.DagsterRunStatus.SUCCESS
            where = _worker_of_each_step(instance, record.run_id)
            starts = instance.all_logs(record.run_id, of_type=dg.DagsterEventType.STEP_START)
            step_pids = {e.step_key: e.dagster_event.pid for e in starts}
    finally:
        for group in workers.values():
            _stop(group)
    assert set(where) == set(PER_DATASET), where
    for step, host in where.items():
        expected = {"gpu1"} if step in GPU_STEPS else {"cpu1", "cpu2"}
        assert host.split("@")[0] in expected, (step, host)
    # each step's process was one of the workers' own (their pool processes), not the launcher's
    assert set(step_pids) == set(PER_DATASET) and set(step_pids.values()) <= recorded, (step_pids, recorded)
    assert not alive(recorded), f"worker processes left running: {sorted(alive(recorded))}"

    # the same per-dataset results as the pipeline without Dagster
    direct = tmp_path / "direct"
    run_direct(DirectRun(data, direct, [NAME]), phases=("datasets",))
    on_celery, by_hand = layout.DatasetLayout(storage, NAME), layout.DatasetLayout(direct, NAME)
    scans = ok_scans(by_hand)
    assert scans and ok_scans(on_celery) == scans
    for scan in scans:
        assert sha256_file(on_celery.masks(scan)) == sha256_file(by_hand.masks(scan)), scan
        assert sha256_file(on_celery.pseudo_label(scan)) == sha256_file(by_hand.pseudo_label(scan)), scan
