"""The docker deployment's storage block against a real, throwaway Postgres cluster.

CI installs Postgres with ``.ci/bootstrap.sh --system``; when its binaries are missing this FAILS (no skip).
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import psycopg2
import pytest
import yaml

from nnsam2_assets.definitions import all_assets
from nnsam2_assets.defs.resources import NnsamStorage, build_resources
from nnsam2_assets.defs.sensors import new_data_sensor
from nnsam2_assets_tests.ops import INGEST, REPO, free_port, write_tiny

DB, USER, PASSWORD = "nnsam2_test", "dagster", "throwaway-test-only"
# pg_ctl's wait needs a limit; this one no machine reaches (it stops waiting when the server dies anyway)
PG_CTL_NO_DEADLINE_S = 10**7


@dataclass
class Cluster:
    port: int
    dsn: dict


def _pg_bin() -> Path:
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not candidates and shutil.which("initdb"):
        candidates = [shutil.which("initdb")]
    if not candidates:
        pytest.fail(
            "Postgres binaries not found (/usr/lib/postgresql/*/bin/initdb): run `bash .ci/bootstrap.sh --system`"
        )
    return Path(candidates[-1]).parent


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[Cluster]:
    bindir = _pg_bin()
    as_root = os.geteuid() == 0
    prefix = ["runuser", "-u", "postgres", "--"] if as_root else []
    tmp = Path(tempfile.mkdtemp(prefix="nnsam2-pg-"))
    if as_root:
        shutil.chown(tmp, "postgres", "postgres")
    data, port = tmp / "data", free_port()
    pwfile = tmp / "pw"
    pwfile.write_text(PASSWORD)
    if as_root:
        shutil.chown(pwfile, "postgres", "postgres")

    def pg(*args, **kw):
        return subprocess.run([*prefix, *args], check=True, capture_output=True, text=True, **kw)

    started = False
    try:
        pg(str(bindir / "initdb"), "-D", str(data), "-U", USER, "--auth=scram-sha-256", f"--pwfile={pwfile}")
        opts = f"-p {port} -k {tmp} -c listen_addresses=127.0.0.1 -c fsync=off"
        pg(
            str(bindir / "pg_ctl"),
            "-D",
            str(data),
            "-o",
            opts,
            "-l",
            str(tmp / "log"),
            "-w",  # pg_ctl returns once the server accepts connections, or at once if it died
            "-t",
            str(PG_CTL_NO_DEADLINE_S),
            "start",
        )
        started = True
        dsn = {"host": "127.0.0.1", "port": port, "user": USER, "password": PASSWORD}
        con = psycopg2.connect(dbname="postgres", **dsn)
        try:
            con.autocommit = True  # CREATE DATABASE cannot run inside a transaction
            con.cursor().execute(f"CREATE DATABASE {DB}")
        finally:
            con.close()
        yield Cluster(port, {**dsn, "dbname": DB})
    finally:
        if started:
            pg(str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture
def pg_instance(pg_cluster: Cluster, tmp_path: Path, monkeypatch) -> Iterator[dg.DagsterInstance]:
    monkeypatch.setenv("DAGSTER_POSTGRES_USER", USER)
    monkeypatch.setenv("DAGSTER_POSTGRES_PASSWORD", PASSWORD)
    monkeypatch.setenv("DAGSTER_POSTGRES_HOST", "127.0.0.1")
    monkeypatch.setenv("DAGSTER_POSTGRES_PORT", str(pg_cluster.port))
    monkeypatch.setenv("DAGSTER_POSTGRES_DB", DB)
    docker_cfg = yaml.safe_load((REPO / "docker" / "dagster.yaml").read_text())
    home = tmp_path / "dagster_home"
    home.mkdir()
    # exactly the docker deployment's storage block (env-var references and all)
    (home / "dagster.yaml").write_text(
        yaml.safe_dump({"telemetry": {"enabled": False}, "storage": docker_cfg["storage"]})
    )
    try:
        instance = dg.DagsterInstance.from_config(str(home))
    except ModuleNotFoundError as exc:
        pytest.fail(
            f"docker/dagster.yaml's Postgres storage cannot load its database driver ({exc}): SQLAlchemy>=2.1 "
            "maps 'postgresql://' to psycopg 3; set `scheme: postgresql+psycopg2` in the postgres_db block, "
            "pin SQLAlchemy<2.1, or install psycopg 3"
        )
    try:
        yield instance
    finally:
        instance.dispose()


def _rows(cluster: Cluster, sql: str, args=()) -> list[tuple]:
    with psycopg2.connect(**cluster.dsn) as con, con.cursor() as cur:
        cur.execute(sql, args)
        return cur.fetchall()


def test_sensor_tick_and_ingest_are_stored_in_postgres(pg_cluster, pg_instance, tmp_path):
    assert type(pg_instance.run_storage).__name__ == "PostgresRunStorage"
    assert type(pg_instance.event_log_storage).__name__ == "PostgresEventLogStorage"
    data, storage_root = tmp_path / "data", tmp_path / "storage"
    write_tiny(data, "pgtiny", n_scans=2)
    storage = NnsamStorage(data_root=str(data), storage_root=str(storage_root))

    tick = new_data_sensor(dg.build_sensor_context(instance=pg_instance, resources={"storage": storage}))
    (add,) = tick.dynamic_partitions_requests
    pg_instance.add_dynamic_partitions(add.partitions_def_name, list(add.partition_keys))
    (request,) = tick.run_requests
    assert request.partition_key == "pgtiny"
    assert _rows(pg_cluster, "SELECT partitions_def_name, partition FROM dynamic_partitions") == [
        ("datasets", "pgtiny")
    ]

    result = dg.materialize(
        all_assets(),
        selection=INGEST,
        partition_key=request.partition_key,
        instance=pg_instance,
        resources=build_resources(data, storage_root),
        tags={"dagster/run_key": request.run_key},
    )
    assert result.success

    runs = _rows(pg_cluster, "SELECT run_id, status FROM runs")
    assert runs == [(result.run_id, "SUCCESS")]
    mats = _rows(
        pg_cluster,
        "SELECT asset_key, partition FROM event_logs WHERE dagster_event_type = 'ASSET_MATERIALIZATION' "
        "AND run_id = %s",
        (result.run_id,),
    )
    assert sorted(mats) == sorted((f'["{a}"]', "pgtiny") for a in INGEST)
    keys = {r[0] for r in _rows(pg_cluster, "SELECT asset_key FROM asset_keys")}
    assert {f'["{a}"]' for a in INGEST} <= keys
    # and Dagster reads them back from Postgres: the sweep's fingerprint metadata is there
    record = pg_instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey("scans"), asset_partitions=["pgtiny"]), limit=1
    ).records[0]
    assert record.asset_materialization.metadata["n_ok"].value == 2
    assert pg_instance.get_run_by_id(result.run_id).tags["dagster/run_key"] == request.run_key
