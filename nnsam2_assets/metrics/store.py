"""The DuckDB metrics file: one schema ``metrics``, rows replaced per dataset in one transaction.

dagster-duckdb's IO manager deletes a partition's rows and inserts the new ones outside one transaction, so
a kill in between loses rows. Here the delete and the insert of every table of a dataset commit together or
not at all. DuckDB allows one writing process per file: writers retry on the lock, and readers open the
file read-only, retrying for a bounded time before failing with a message that names the file.

User SQL (``nnsam2 sql``, ``nnsam2 export``) must not reach the disk beyond this file: a read-only
connection alone still lets ``COPY ... TO`` overwrite files, ``ATTACH`` write other databases and
``read_text`` read any file. So user connections also set ``enable_external_access = false`` and lock the
configuration, so DuckDB itself refuses file access, and only one SELECT statement is accepted, as DuckDB's
own parser classifies it (never by keyword matching).

Tables (all carry ``dataset`` and lineage columns ``run_id``, ``computed_at``):
  metrics.scan_metrics      per scan x label: volume, HU, fat ratio, Dice vs expert, QC flags, lineage
  metrics.slice_confidence  per scan x slice x class: propagation confidence, presence, kept as pseudo-label
  metrics.slice_metrics     per scan x slice x label: cross-sectional area and fat ratio
  metrics.level_metrics     per scan x level segment x label (when the region names L4/L5): volume, mean
                            cross-sectional area, HU, fat ratio
  metrics.stage_agreement   per scan: Dice between nnU-Net stages and against the propagation / experts
  metrics.agreement         per dataset x measure x label: TOST, ICC, Bland-Altman, MAE, Spearman
  metrics.qc_flags          per scan x flag: reason and severity
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import duckdb
import pandas as pd

from nnsam2_assets.core.layout import METRICS_SCHEMA, check_duckdb_name
from nnsam2_assets.core.storage import atomic_write_dataframe

T = TypeVar("T")

SCHEMA = METRICS_SCHEMA
TABLES = (
    "scan_metrics",
    "slice_confidence",
    "slice_metrics",
    "level_metrics",
    "stage_agreement",
    "agreement",
    "qc_flags",
)


# DuckDB settings of every connection that runs user SQL.
USER_SQL_CONFIG = {
    "enable_external_access": False,
    "autoinstall_known_extensions": False,
    "autoload_known_extensions": False,
    # the metrics are thousands of rows: a runaway join fails at these bounds instead of taking the machine's
    # memory and its disk under the storage root (DuckDB's own defaults are 80 % of memory, 90 % of free disk)
    "memory_limit": "4GB",
    "max_temp_directory_size": "4GB",
}
# then set on each of those connections, in this order: DuckDB draws its progress bar on stdout even into a
# pipe (`nnsam2 sql --csv ... > out.csv` began with it), and lock_configuration, last, keeps a user's SET from
# undoing any of these
USER_SQL_SESSION = {"enable_progress_bar": False, "lock_configuration": True}
WHOLE_NUMBER_TYPES = {
    "TINYINT",
    "SMALLINT",
    "INTEGER",
    "BIGINT",
    "HUGEINT",
    "UTINYINT",
    "USMALLINT",
    "UINTEGER",
    "UBIGINT",
}
FRACTION_TYPES = {"FLOAT", "DOUBLE"}
_TABLE_NAME = re.compile(r"(?:(?P<schema>[A-Za-z_]\w*)\.)?(?P<table>[A-Za-z_]\w*)")


class MetricsDBError(RuntimeError):
    pass


class RefusedSQLError(MetricsDBError):
    """User SQL that would do more than read the metrics; the message is one line."""


def one_line(text: str) -> str:
    return " ".join(str(text).strip().splitlines()[0].split()) if str(text).strip() else ""


def check_one_select(sql: str) -> str:
    """Return ``sql`` if DuckDB's parser sees exactly one SELECT statement in it; refuse anything else."""
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as exc:
        raise RefusedSQLError(f"refused: the SQL does not parse ({one_line(exc)})") from exc
    if len(statements) != 1:
        raise RefusedSQLError(
            f"refused: exactly one SELECT statement per call, got {len(statements)} statements"
        )
    kind = statements[0].type
    if kind != duckdb.StatementType.SELECT:
        raise RefusedSQLError(f"refused: only SELECT statements are allowed, got {kind.name}")
    return sql


# what DuckDB says when another process holds the file (POSIX lock; the Windows sharing violation)
LOCK_MESSAGES = ("Could not set lock on file", "Conflicting lock is held", "being used by another process")


def _is_lock_error(exc: Exception) -> bool:
    """Only DuckDB's own lock messages: a damaged file, or one whose path happens to contain "lock", fails at
    once with its own error instead of being retried as "still locked"."""
    return isinstance(exc, duckdb.IOException) and any(m in str(exc) for m in LOCK_MESSAGES)


def connect(
    path: Path, read_only: bool = False, wait_s: float = 30.0, poll_s: float = 0.2, config: dict | None = None
):
    """Open the file, retrying while another process holds its lock; clear error after ``wait_s``."""
    path = Path(path)
    try:
        check_duckdb_name(path)
    except ValueError as exc:
        raise MetricsDBError(str(exc)) from exc
    if read_only and not path.exists():
        raise MetricsDBError(f"{path}: no metrics database yet (materialize scan_metrics first)")
    path.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return duckdb.connect(str(path), read_only=read_only, config=dict(config or {}))
        except duckdb.Error as exc:
            if not _is_lock_error(exc):
                raise MetricsDBError(f"{path}: cannot open the metrics database ({exc})") from exc
            if time.monotonic() >= deadline:
                mode = "read" if read_only else "write"
                raise MetricsDBError(
                    f"{path}: still locked by another process after {wait_s:.0f} s; cannot {mode} "
                    f"(a materialization is writing metrics; retry later or raise --wait)"
                ) from exc
            time.sleep(poll_s)


def _quoted(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _ensure_table(con, table: str, df: pd.DataFrame) -> None:
    """The table with every column of ``df``: created from its types, or grown by the columns a newer code
    version adds (old rows read NULL there). A whole-number column that now carries fractions is widened to
    DOUBLE, so no value is rounded on insert (pandas turns an integer column with a missing value into
    float)."""
    con.register("_incoming", df)
    con.execute(f"CREATE TABLE IF NOT EXISTS {SCHEMA}.{table} AS SELECT * FROM _incoming LIMIT 0")
    # the frame's column types, as DuckDB reads them from pandas (a frame without rows has them too)
    incoming = {
        col: sql_type for col, sql_type, *_ in con.execute("DESCRIBE SELECT * FROM _incoming").fetchall()
    }
    described = con.execute(f"DESCRIBE {SCHEMA}.{table}").fetchall()
    for col, sql_type, *_ in described:
        if sql_type == '"NULL"':  # a column created from no values (an empty text column) holds text
            con.execute(f"ALTER TABLE {SCHEMA}.{table} ALTER COLUMN {_quoted(col)} TYPE VARCHAR")
    existing = {col.lower(): sql_type for col, sql_type, *_ in described}  # DuckDB's names ignore case
    for col, sql_type in incoming.items():
        have = existing.get(col.lower())
        if have is None:
            new_type = "VARCHAR" if sql_type in ("NULL", '"NULL"') else sql_type
            con.execute(f"ALTER TABLE {SCHEMA}.{table} ADD COLUMN {_quoted(col)} {new_type}")
        elif have in WHOLE_NUMBER_TYPES and sql_type in FRACTION_TYPES:
            con.execute(f"ALTER TABLE {SCHEMA}.{table} ALTER COLUMN {_quoted(col)} TYPE DOUBLE")
        elif sql_type == "BOOLEAN" and (have in WHOLE_NUMBER_TYPES or have in FRACTION_TYPES):
            # a yes/no column first written with no answer was typed a number: its 1.0 / 0.0 become yes / no
            con.execute(f"ALTER TABLE {SCHEMA}.{table} ALTER COLUMN {_quoted(col)} TYPE BOOLEAN")
    con.unregister("_incoming")


def _table_exists(con, table: str) -> bool:
    sql = "SELECT count(*) FROM information_schema.tables WHERE table_schema = ? AND table_name = ?"
    return bool(con.execute(sql, [SCHEMA, table]).fetchone()[0])


def replace_dataset_rows(con, dataset: str, tables: Mapping[str, pd.DataFrame]) -> dict:
    """Replace every row of ``dataset`` in the given tables in ONE transaction on an open connection."""
    unknown = set(tables) - set(TABLES)
    if unknown:
        raise ValueError(f"unknown metrics tables {sorted(unknown)}; known: {TABLES}")
    for table, df in tables.items():
        if not df.empty and set(df.dataset.unique()) != {dataset}:
            raise ValueError(f"rows for table {table} must all belong to dataset {dataset!r}")
    con.execute(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}")
    for table, df in tables.items():
        if len(df.columns):  # rows or not: a table with known columns exists for the users' queries
            _ensure_table(con, table, df)
    con.execute("BEGIN TRANSACTION")
    try:
        written = {}
        for table, df in tables.items():
            if _table_exists(con, table):
                con.execute(f"DELETE FROM {SCHEMA}.{table} WHERE dataset = ?", [dataset])
            if not df.empty:
                con.register("_incoming", df)
                con.execute(f"INSERT INTO {SCHEMA}.{table} BY NAME SELECT * FROM _incoming")
                con.unregister("_incoming")
            written[table] = len(df)
        con.execute("COMMIT")
    except BaseException:
        # a failed COMMIT has ended the transaction already; the error to report is the first one
        with contextlib.suppress(duckdb.Error):
            con.execute("ROLLBACK")
        raise
    return written


def replace_dataset(
    path: Path, dataset: str, tables: Mapping[str, pd.DataFrame], wait_s: float = 120.0
) -> dict:
    """Open the file (waiting for another writer's lock) and replace ``dataset``'s rows in one transaction."""
    con = connect(path, read_only=False, wait_s=wait_s)
    try:
        return replace_dataset_rows(con, dataset, tables)
    finally:
        con.close()


def _configure_session(con: Any) -> None:
    """USER_SQL_SESSION on a connection, in order. Connections to one file in one process share its instance:
    one opened beside another (in this thread or, at the same moment, in another) finds the configuration
    locked already, holding what these set, and is left as it is."""
    for name, value in USER_SQL_SESSION.items():
        try:
            con.execute(f"SET {name} = {str(value).lower()}")  # our constants, never user text
        except duckdb.InvalidInputException:
            if not con.execute("SELECT current_setting('lock_configuration')").fetchone()[0]:
                raise
            return


def _read(path: Path, wait_s: float, work: Callable[[Any], T], poll_s: float = 0.2) -> T:
    """``work`` on a fresh read-only user-SQL connection, again on a fresh one after an I/O error, until
    ``wait_s`` has passed.

    Why: under load, a reader running beside two writers once failed mid-query with "Could not read enough
    bytes from file" (the suite's concurrent-writers test, 2026-12-06; not reproduced in 500 further reads),
    though it held the file's read lock. A fresh connection reads the file as the last writer committed it,
    and a read changes nothing, so it is safe to repeat."""
    deadline = time.monotonic() + wait_s
    while True:
        con = connect(
            path, read_only=True, wait_s=max(deadline - time.monotonic(), 0.0), config=USER_SQL_CONFIG
        )
        try:
            _configure_session(con)
            return work(con)
        except duckdb.IOException as exc:
            if time.monotonic() >= deadline:
                raise MetricsDBError(f"{path}: cannot read the metrics database ({one_line(exc)})") from exc
        finally:
            con.close()
        time.sleep(poll_s)


def query(path: Path, sql: str, wait_s: float = 30.0) -> pd.DataFrame:
    """Run one user SELECT on a read-only connection that DuckDB keeps off every other file."""
    check_one_select(sql)

    def run(con) -> pd.DataFrame:
        try:
            return con.execute(sql).df()
        except duckdb.PermissionException as exc:
            raise RefusedSQLError(f"refused by DuckDB: {one_line(exc)}") from exc

    return _read(path, wait_s, run)


def dataset_rows(path: Path, table: str, dataset: str, wait_s: float = 30.0) -> pd.DataFrame:
    """Every row of ``dataset`` in one metrics table, read with the dataset as a bound parameter (never spliced
    into the SQL) on a user-SQL connection. A table that no dataset has written yet reads as empty."""
    return dataset_tables(path, (table,), dataset, wait_s)[table]


def dataset_tables(
    path: Path, tables: Sequence[str], dataset: str, wait_s: float = 30.0
) -> dict[str, pd.DataFrame]:
    """``dataset``'s rows in each of ``tables``, read on one connection: one committed state of the file, so
    that a writer committing between two tables' reads cannot mix two runs' rows in one report."""
    unknown = [t for t in tables if t not in TABLES]
    if unknown:
        raise MetricsDBError(f"unknown table {unknown[0]!r}; one of {', '.join(TABLES)}")

    def rows(con) -> dict[str, pd.DataFrame]:
        return {
            table: con.execute(f"SELECT * FROM {SCHEMA}.{table} WHERE dataset = ?", [dataset]).df()
            if _table_exists(con, table)
            else pd.DataFrame()
            for table in tables
        }

    return _read(path, wait_s, rows)


EXPORT_SUFFIXES = (".csv", ".parquet")


def export_query(sql_or_table: str) -> str:
    """A bare table name exports that metrics table; anything else must be one SELECT (checked in ``query``)."""
    text = sql_or_table.strip()
    name = _TABLE_NAME.fullmatch(text)
    if name is None:
        return text
    if name["schema"] not in (None, SCHEMA) or name["table"] not in TABLES:
        raise MetricsDBError(
            f"unknown table {text!r}; export one of {', '.join(TABLES)} or a SELECT statement"
        )
    return f"SELECT * FROM {SCHEMA}.{name['table']}"


def export(path: Path, sql_or_table: str, out: Path, wait_s: float = 30.0) -> Path:
    """Export a metrics table or one SELECT's result to CSV or Parquet (by the output suffix), atomically."""
    out = Path(out)
    if out.suffix not in EXPORT_SUFFIXES:
        raise MetricsDBError(f"{out}: unknown output suffix {out.suffix or '(none)'!r}; use .csv or .parquet")
    rows = query(path, export_query(sql_or_table), wait_s)
    try:
        return atomic_write_dataframe(rows, out)
    except OSError as exc:  # named as the output, not as the temporary file beside it, nor a failed query
        raise MetricsDBError(f"{out}: cannot be written ({exc.strerror or type(exc).__name__})") from exc
