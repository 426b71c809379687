"""``nnsam2 sql`` / ``nnsam2 export`` as a user runs them (subprocesses), with a writer holding the lock."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from nnsam2_assets.metrics.store import replace_dataset

HOLD = """
import sys, duckdb
con = duckdb.connect(sys.argv[1])   # a write connection: DuckDB's file lock, as a materialization holds it
con.execute("INSERT INTO metrics.scan_metrics SELECT * FROM metrics.scan_metrics WHERE false")
print("locked", flush=True)
sys.stdin.readline()  # held until the test lets go: no machine is too slow for the lock to outlast it
con.close()
print("released", flush=True)
"""


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nnsam2_assets.cli", *args], capture_output=True, text=True)


@pytest.fixture
def db(tmp_path: Path) -> Path:
    path = tmp_path / "nnsam2.duckdb"
    rows = pd.DataFrame(
        {
            "dataset": "demo",
            "scan": ["s0", "s1", "s2"],
            "class_name": ["right_es", "right_es", "left_es"],
            "volume_ml": [10.5, 11.0, 9.25],
            "run_id": "r1",
            "computed_at": pd.Timestamp("2024-01-01", tz="UTC"),
        }
    )
    replace_dataset(path, "demo", {"scan_metrics": rows})
    return path


@pytest.fixture
def holder(db: Path):
    procs = []

    def start() -> subprocess.Popen:
        """A writer holding the database's lock until the test closes its stdin."""
        proc = subprocess.Popen(
            [sys.executable, "-c", HOLD, str(db)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        procs.append(proc)
        assert proc.stdout.readline().strip() == "locked"
        return proc

    yield start
    for proc in procs:
        proc.kill()
        proc.wait()


def test_sql_waits_for_the_writer_to_let_go(db, holder, monkeypatch, capsys):
    """The writer lets go only once the CLI has found the lock held, so the CLI must have waited; no clock
    decides the outcome (a 2 s hold against a 20 s wait had raced a slow machine's start-up)."""
    from nnsam2_assets import cli
    from nnsam2_assets.metrics import store

    proc = holder()
    connect, lock_errors = store.duckdb.connect, []

    def connect_and_release_on_the_first_lock_error(*args, **kwargs):
        try:
            return connect(*args, **kwargs)
        except store.duckdb.Error as exc:
            if store._is_lock_error(exc):
                lock_errors.append(exc)
                if len(lock_errors) == 1:
                    proc.stdin.close()  # the writer lets go
                    assert proc.stdout.readline().strip() == "released"
            raise

    monkeypatch.setattr(store.duckdb, "connect", connect_and_release_on_the_first_lock_error)
    sql = "SELECT scan, volume_ml FROM metrics.scan_metrics ORDER BY scan"
    assert cli.main(["sql", sql, "--db", str(db), "--wait", "inf"]) == 0
    assert lock_errors  # it met the writer's lock, and waited it out
    lines = capsys.readouterr().out.split()
    assert lines[:2] == ["scan", "volume_ml"] and "s0" in lines and "9.25" in lines


def test_sql_fails_clearly_when_the_writer_holds_past_wait(db, holder):
    proc = holder()
    out = _cli("sql", "SELECT count(*) FROM metrics.scan_metrics", "--db", str(db), "--wait", "1")
    assert proc.poll() is None  # the writer still held the lock when the CLI gave up
    assert out.returncode == 2, (out.returncode, out.stdout, out.stderr)
    assert str(db) in out.stderr and "still locked by another process" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr


def test_sql_error_and_missing_database(db, tmp_path):
    bad = _cli("sql", "SELECT nope FROM metrics.scan_metrics", "--db", str(db), "--wait", "1")
    assert bad.returncode == 1 and "query failed" in bad.stderr and "nope" in bad.stderr
    missing = tmp_path / "none.duckdb"
    out = _cli("sql", "SELECT 1", "--db", str(missing), "--wait", "1")
    assert out.returncode == 2 and str(missing) in out.stderr and "no metrics database yet" in out.stderr
    with pytest.raises(Exception):  # noqa: B017 - read-only: a user query cannot modify the file
        from nnsam2_assets.metrics.store import query

        query(db, "DELETE FROM metrics.scan_metrics", wait_s=1)
    assert len(pd.read_csv(_export(db, "scan_metrics", tmp_path / "after.csv"))) == 3


def _export(db: Path, what: str, out: Path) -> Path:
    res = _cli("export", what, str(out), "--db", str(db), "--wait", "5")
    assert res.returncode == 0, res.stderr
    assert str(out) in res.stdout
    return out


def test_export_csv_and_parquet(db, tmp_path):
    want = pd.DataFrame({"scan": ["s0", "s1", "s2"], "volume_ml": [10.5, 11.0, 9.25]})
    csv = pd.read_csv(_export(db, "scan_metrics", tmp_path / "out" / "m.csv"))
    assert csv[["scan", "volume_ml"]].sort_values("scan").reset_index(drop=True).equals(want)
    assert {"dataset", "class_name", "run_id", "computed_at"} <= set(csv.columns)
    pq = pd.read_parquet(
        _export(db, "SELECT scan, volume_ml FROM metrics.scan_metrics ORDER BY scan", tmp_path / "q.parquet")
    )
    pd.testing.assert_frame_equal(pq, want)
    res = _cli("export", "scan_metrics", str(tmp_path / "m.xlsx"), "--db", str(db))
    assert res.returncode != 0 and "m.xlsx" in res.stderr
    # a place it cannot write (its "folder" is a file): named as the output; it had named a temporary file,
    # as a query's failure
    (tmp_path / "a-file").write_text("")
    out = tmp_path / "a-file" / "m.csv"
    res = _cli("export", "scan_metrics", str(out), "--db", str(db))
    assert res.returncode == 2 and res.stderr.strip().startswith(f"nnsam2 export: {out}: cannot be written")


def test_report_without_a_database_says_so_without_a_traceback(tmp_path):
    import os

    from nnsam2_assets.testing.cohorts import write_tiny_dataset

    write_tiny_dataset(tmp_path / "data", "ds", 2)
    env = {
        **os.environ,
        "NNSAM2_HOME": str(tmp_path),
        "NNSAM2_DATA_ROOT": str(tmp_path / "data"),
        "NNSAM2_STORAGE_ROOT": str(tmp_path / "storage"),
    }
    env.pop("NNSAM2_DUCKDB", None)
    out = subprocess.run(
        [sys.executable, "-m", "nnsam2_assets.cli", "report", "ds"], capture_output=True, text=True, env=env
    )
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.startswith("nnsam2 report: ") and "no metrics database yet" in out.stderr
