"""The DuckDB metrics file: one schema ``metrics``, rows replaced per dataset in one transaction.

dagster-duckdb's IO manager deletes a partition's rows and inserts the new ones outside one transaction, so
a kill in between loses rows. Here the delete and the insert of every table of a dataset commit together or
not at all. DuckDB allows one writing process per file: writers retry on the lock, and readers open the
file read-only, retrying for a bounded time before failing with a message that names the file.

Tables (all carry ``dataset`` and lineage columns ``run_id``, ``computed_at``):
  metrics.scan_metrics      per scan x label: volume, HU, fat ratio, Dice vs expert, QC flags, lineage
  metrics.slice_confidence  per scan x slice x class: propagation confidence, presence, kept as pseudo-label
  metrics.slice_metrics     per scan x slice x label: cross-sectional area and fat ratio
  metrics.stage_agreement   per scan: Dice between nnU-Net stages and against the propagation / experts
  metrics.agreement         per dataset x measure x label: TOST, ICC, Bland-Altman, MAE, Spearman
  metrics.qc_flags          per scan x flag: reason and severity
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path

import duckdb
import pandas as pd

from nnsam2_assets.core.storage import atomic_write_dataframe

SCHEMA = "metrics"
TABLES = ("scan_metrics", "slice_confidence", "slice_metrics", "stage_agreement", "agreement", "qc_flags")


class MetricsDBError(RuntimeError):
    pass


def _is_lock_error(exc: Exception) -> bool:
    text = str(exc).lower()
    return "lock" in text or "conflicting" in text or "being used" in text


def connect(path: Path, read_only: bool = False, wait_s: float = 30.0, poll_s: float = 0.2):
    """Open the file, retrying while another process holds its lock; clear error after ``wait_s``."""
    path = Path(path)
    if read_only and not path.exists():
        raise MetricsDBError(f"{path}: no metrics database yet (materialize scan_metrics first)")
    path.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return duckdb.connect(str(path), read_only=read_only)
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


def _ensure_table(con, table: str, df: pd.DataFrame) -> None:
    con.register("_incoming", df)
    con.execute(f"CREATE TABLE IF NOT EXISTS {SCHEMA}.{table} AS SELECT * FROM _incoming LIMIT 0")
    existing = {r[0] for r in con.execute(f"DESCRIBE {SCHEMA}.{table}").fetchall()}
    for col in df.columns:
        if col not in existing:  # schema grows with new metrics; old rows read NULL there
            dtype = con.execute(f'SELECT typeof("{col}") FROM _incoming LIMIT 1').fetchone()
            sql_type = dtype[0] if dtype and dtype[0] != "NULL" else "VARCHAR"
            con.execute(f'ALTER TABLE {SCHEMA}.{table} ADD COLUMN "{col}" {sql_type}')
    con.unregister("_incoming")


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
        if not df.empty:
            _ensure_table(con, table, df)
    con.execute("BEGIN TRANSACTION")
    try:
        written = {}
        for table, df in tables.items():
            exists = con.execute(
                "SELECT count(*) FROM information_schema.tables WHERE table_schema = ? AND table_name = ?",
                [SCHEMA, table],
            ).fetchone()[0]
            if exists:
                con.execute(f"DELETE FROM {SCHEMA}.{table} WHERE dataset = ?", [dataset])
            if not df.empty:
                con.register("_incoming", df)
                con.execute(f"INSERT INTO {SCHEMA}.{table} BY NAME SELECT * FROM _incoming")
                con.unregister("_incoming")
            written[table] = len(df)
        con.execute("COMMIT")
    except BaseException:
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


def query(path: Path, sql: str, wait_s: float = 30.0) -> pd.DataFrame:
    """Run a read-only query (the file is opened read_only, so a user query can never modify it)."""
    con = connect(path, read_only=True, wait_s=wait_s)
    try:
        return con.execute(sql).df()
    finally:
        con.close()


def export(path: Path, sql_or_table: str, out: Path, wait_s: float = 30.0) -> Path:
    """Export a table or query result to CSV or Parquet (by the output suffix)."""
    sql = sql_or_table if " " in sql_or_table.strip() else f"SELECT * FROM {SCHEMA}.{sql_or_table}"
    out = Path(out)
    if out.suffix not in (".csv", ".parquet"):
        raise ValueError(f"{out}: export to .csv or .parquet")
    return atomic_write_dataframe(query(path, sql, wait_s), out)
