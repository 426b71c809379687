"""User SQL reads the metrics and nothing else: no writes to any file, no reads outside the database.

Each hostile statement is refused with a one-line message and the database file is byte-identical after it.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from nnsam2_assets.metrics.store import (
    MetricsDBError,
    RefusedSQLError,
    dataset_rows,
    export,
    query,
    replace_dataset,
)


@pytest.fixture
def db(tmp_path: Path) -> Path:
    path = tmp_path / "nnsam2.duckdb"
    rows = pd.DataFrame({"dataset": "demo", "scan": ["s0", "s1"], "volume_ml": [10.5, 11.0], "run_id": "r1"})
    replace_dataset(path, "demo", {"scan_metrics": rows})
    (tmp_path / "outside.csv").write_text("a,b\n1,2\n")
    pd.DataFrame({"a": [1]}).to_parquet(tmp_path / "outside.parquet")
    return path


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def hostile(tmp: Path, db: Path) -> list[str]:
    other, target = tmp / "other.duckdb", tmp / "written.csv"
    return [
        f"COPY (SELECT 'overwritten') TO '{db}' (FORMAT csv); SELECT 1",
        f"COPY (SELECT 'overwritten') TO '{target}' (FORMAT csv)",
        f"COPY metrics.scan_metrics TO '{target}'",
        f"ATTACH '{other}' AS o (READ_WRITE); CREATE TABLE o.t AS SELECT 42",
        f"ATTACH '{other}' AS o",
        "SELECT count(*) FROM read_text('/etc/shadow')",
        "SELECT * FROM read_text('/etc/passwd')",
        "SELECT * FROM read_blob('/etc/passwd')",
        "SELECT * FROM glob('/etc/*')",
        f"SELECT * FROM glob('{tmp}/*')",
        f"SELECT * FROM read_parquet('{tmp / 'outside.parquet'}')",
        f"SELECT * FROM read_csv_auto('{tmp / 'outside.csv'}')",
        f"SELECT * FROM '{tmp / 'outside.csv'}'",
        "INSTALL httpfs",
        "LOAD httpfs",
        "SET enable_external_access = true",
        "SET threads = 1",
        "PRAGMA enable_profiling",
        "PRAGMA database_list",
        "CREATE MACRO twice(a) AS a * 2",
        "CREATE TEMP TABLE t AS SELECT 1",
        "DELETE FROM metrics.scan_metrics",
        "DROP TABLE metrics.scan_metrics",
        "CHECKPOINT",
        f"EXPORT DATABASE '{tmp / 'dump'}'",
        "CALL pragma_version()",
        f"/* a comment */ CoPy (select 1) tO '{target}'",
        f"-- leading comment\nselect 1; copy (select 1) to '{target}'",
        f"SELECT 1;;COPY (SELECT 1) TO '{target}'",
        f"sElEcT 1; AtTaCh '{other}' AS o",
        "SELECT 1; SELECT 2",
        "",
        "not sql at all",
    ]


def test_every_hostile_statement_is_refused_and_the_file_is_unchanged(db, tmp_path):
    before, files = _digest(db), _files(tmp_path)
    for sql in hostile(tmp_path, db):
        with pytest.raises(RefusedSQLError) as caught:
            query(db, sql, wait_s=1)
        message = str(caught.value)
        assert message.startswith("refused") and "\n" not in message, (sql, message)
        assert _digest(db) == before, f"{sql!r} changed the database"
        assert _files(tmp_path) == files, f"{sql!r} created or removed files"
    assert query(db, "SELECT count(*) AS n FROM metrics.scan_metrics").n.item() == 2


def test_reading_statements_still_work(db):
    assert query(db, "-- volumes\nSELECT scan FROM metrics.scan_metrics ORDER BY scan;").scan.tolist() == [
        "s0",
        "s1",
    ]
    assert "volume_ml" in query(db, "DESCRIBE metrics.scan_metrics").column_name.tolist()
    assert "scan_metrics" in query(db, "SHOW ALL TABLES").name.tolist()
    with_cte = "WITH v AS (FROM metrics.scan_metrics) SELECT max(volume_ml) AS m FROM v"
    assert query(db, with_cte).m.item() == 11.0


@pytest.mark.parametrize(
    "name",
    [
        "scan_metrics;COPY(SELECT 1)TO'x.csv'",
        "scan_metrics; COPY (SELECT 1) TO 'x.csv'",
        "FROM read_text('/etc/passwd')",
        "metrics.scan_metrics UNION ALL SELECT * FROM read_text('/etc/passwd')",
    ],
)
def test_sql_passed_as_an_export_table_name_is_refused(db, tmp_path, name):
    before = _digest(db)
    with pytest.raises(RefusedSQLError):
        export(db, name, tmp_path / "out.csv", wait_s=1)
    assert _digest(db) == before and not (tmp_path / "out.csv").exists() and not Path("x.csv").exists()


def test_export_refuses_unknown_tables_and_suffixes(db, tmp_path):
    with pytest.raises(MetricsDBError, match="unknown table 'passwords'.*scan_metrics"):
        export(db, "passwords", tmp_path / "out.csv", wait_s=1)
    with pytest.raises(MetricsDBError, match="other_schema.scan_metrics"):
        export(db, "other_schema.scan_metrics", tmp_path / "out.csv", wait_s=1)
    with pytest.raises(MetricsDBError, match=r"out\.xlsx.*unknown output suffix"):
        export(db, "scan_metrics", tmp_path / "out.xlsx", wait_s=1)
    assert len(pd.read_csv(export(db, "metrics.scan_metrics", tmp_path / "ok.csv", wait_s=1))) == 2


@pytest.mark.parametrize(
    "dataset",
    [
        "demo' OR '1'='1",
        "demo'; DROP TABLE metrics.scan_metrics; --",
        "x' UNION SELECT * FROM read_text('/etc/passwd') --",
    ],
)
def test_a_dataset_name_is_a_bound_parameter_never_sql(db, dataset):
    before = _digest(db)
    assert dataset_rows(db, "scan_metrics", dataset, wait_s=1).empty
    assert _digest(db) == before
    assert dataset_rows(db, "scan_metrics", "demo", wait_s=1).scan.tolist() == ["s0", "s1"]


def test_dataset_rows_reads_known_tables_only(db):
    assert dataset_rows(db, "qc_flags", "demo", wait_s=1).empty  # no dataset wrote flags yet
    with pytest.raises(MetricsDBError, match="unknown table 'scan_metrics WHERE 1=1 --'"):
        dataset_rows(db, "scan_metrics WHERE 1=1 --", "demo", wait_s=1)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nnsam2_assets.cli", *args], capture_output=True, text=True)


def test_the_cli_prints_one_line_refusals_without_tracebacks(db, tmp_path):
    before = _digest(db)
    cases = [
        ("sql", f"COPY (SELECT 'overwritten') TO '{db}' (FORMAT csv); SELECT 1", "exactly one SELECT"),
        ("sql", "SELECT count(*) FROM read_text('/etc/shadow')", "refused by DuckDB"),
        ("export", "SELECT * FROM read_text('/etc/passwd')", "refused by DuckDB"),
        ("export", "no_such_table", "unknown table 'no_such_table'"),
    ]
    for command, sql, expected in cases:
        args = (
            [command, sql] + ([str(tmp_path / "out.csv")] if command == "export" else []) + ["--db", str(db)]
        )
        res = _cli(*args)
        assert res.returncode == 2, (sql, res.stdout, res.stderr)
        assert expected in res.stderr and "Traceback" not in res.stderr, res.stderr
        assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    res = _cli("export", "scan_metrics", str(tmp_path / "out.xlsx"), "--db", str(db))
    assert res.returncode == 2 and "unknown output suffix" in res.stderr and "Traceback" not in res.stderr
    assert _digest(db) == before and not (tmp_path / "out.csv").exists()


def test_user_sql_runs_bounded_and_without_a_progress_bar_in_its_output(db):
    """DuckDB's defaults let one statement take 80 % of memory and 90 % of free disk under the storage root,
    and its progress bar went to stdout, into ``nnsam2 sql --csv``'s file."""
    settings = query(
        db,
        "SELECT current_setting('enable_progress_bar') AS bar, current_setting('memory_limit') AS memory, "
        "current_setting('max_temp_directory_size') AS spill",
    ).iloc[0]
    assert not settings.bar
    for limit in (settings.memory, settings.spill):
        number, unit = limit.split()
        assert unit in ("MiB", "GiB") and float(number) * (1 if unit == "MiB" else 1024) <= 4 * 1024, limit


def test_a_second_reader_beside_the_first_in_one_process_reads(db):
    """Connections to one file in one process share an instance: a reader opened while another was open
    found the configuration locked and failed setting it again."""
    from nnsam2_assets.metrics.store import _read

    inner: list[int] = []

    def outer(con):
        inner.append(int(query(db, "SELECT count(*) AS n FROM metrics.scan_metrics").n.iloc[0]))
        return con.execute("SELECT count(*) FROM metrics.scan_metrics").fetchone()[0]

    assert _read(db, 5.0, outer) == 2 and inner == [2]


def test_a_session_locked_by_another_reader_in_between_is_left_as_it_is(db):
    """Two readers in two threads: the other may lock the shared configuration between this one's check and
    its own settings. The setting then failed the query; the lock already holds the bounds."""
    import duckdb

    from nnsam2_assets.metrics.store import USER_SQL_CONFIG, _configure_session

    con = duckdb.connect(str(db), read_only=True, config=USER_SQL_CONFIG)
    try:
        con.execute("SET lock_configuration = true")  # the other thread, first
        _configure_session(con)
        assert con.execute("SELECT count(*) FROM metrics.scan_metrics").fetchone()[0] == 2
    finally:
        con.close()
