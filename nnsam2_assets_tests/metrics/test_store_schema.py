"""The metrics file across code versions and failures: a column a new version adds keeps its type even when
the first frame to bring it has no rows, a whole-number column that now carries fractions is widened instead
of rounded, names are quoted, and only DuckDB's own lock message is waited on."""

from __future__ import annotations

import duckdb
import pandas as pd
import pytest

from nnsam2_assets.metrics import store


def _types(db, table: str) -> dict[str, str]:
    with duckdb.connect(str(db), read_only=True) as con:
        return {c: t for c, t, *_ in con.execute(f"DESCRIBE metrics.{table}").fetchall()}


def test_new_columns_keep_their_types_and_whole_numbers_widen_instead_of_rounding(tmp_path):
    db = tmp_path / "nnsam2.duckdb"
    store.replace_dataset(db, "a", {"qc_flags": pd.DataFrame({"dataset": ["a"], "scan": ["s0"], "n": [2]})})
    # a newer version adds typed columns, first from a dataset without rows
    empty = pd.DataFrame(
        {
            "dataset": pd.Series([], dtype=object),
            "scan": pd.Series([], dtype=object),
            "n": pd.Series([], dtype="int64"),
            "weight": pd.Series([], dtype="float64"),
            "at": pd.Series([], dtype="datetime64[ns, UTC]"),
            'odd "name"': pd.Series([], dtype="float64"),
        }
    )
    store.replace_dataset(db, "b", {"qc_flags": empty})
    types = _types(db, "qc_flags")
    assert (
        types["weight"] == "DOUBLE"
        and types["at"].startswith("TIMESTAMP")
        and types['odd "name"'] == "DOUBLE"
    )
    # the same column now holds a fraction (pandas makes an int column with a gap float)
    store.replace_dataset(db, "c", {"qc_flags": pd.DataFrame({"dataset": ["c"], "scan": ["s0"], "n": [2.5]})})
    assert _types(db, "qc_flags")["n"] == "DOUBLE"
    assert store.dataset_rows(db, "qc_flags", "c").n.tolist() == [2.5]
    assert store.dataset_rows(db, "qc_flags", "a").n.tolist() == [2.0]
    # a column differing only in case is the same column to DuckDB
    store.replace_dataset(db, "d", {"qc_flags": pd.DataFrame({"dataset": ["d"], "scan": ["s0"], "N": [3]})})
    assert store.dataset_rows(db, "qc_flags", "d").n.tolist() == [3.0]


def test_a_damaged_file_in_a_folder_named_blocks_fails_at_once_with_its_own_error(tmp_path):
    folder = tmp_path / "blocks"
    folder.mkdir()
    (folder / "m.duckdb").write_text("not a database")
    with pytest.raises(store.MetricsDBError, match="cannot open the metrics database") as caught:
        store.connect(folder / "m.duckdb", read_only=True, wait_s=60)
    assert "still locked" not in str(caught.value)
    lock = duckdb.IOException('IO Error: Could not set lock on file "/x/m.duckdb": Conflicting lock is held')
    assert store._is_lock_error(lock)
    assert not store._is_lock_error(duckdb.IOException('Corrupt database file "/data/blocks/lock.duckdb"'))
