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


def test_tost_equivalent_stays_yes_or_no_whichever_dataset_is_written_first(tmp_path):
    """A pilot dataset with fewer than 3 expert scans, written first, typed ``tost_equivalent`` DOUBLE: every
    later answer became 1.0 or 0.0 in the CSVs and SQL. Read back as pandas' NA, a missing answer crashed the
    report."""
    import numpy as np

    from nnsam2_assets.metrics.steps import agreement_with_experts
    from nnsam2_assets.outputs.report import cell

    def rows(dataset: str, n: int) -> pd.DataFrame:
        volumes = 100.0 + np.arange(n)
        return pd.DataFrame(
            {
                "dataset": dataset,
                "scan": [f"s{i}" for i in range(n)],
                "scheme": "2-class",
                "class_name": "right_lpm",
                "volume_ml": volumes * 1.001,
                "expert_volume_ml": volumes,
            }
        )

    db = tmp_path / "m.duckdb"
    for dataset, n in (("pilot", 2), ("main", 5)):
        table, _ = agreement_with_experts(rows(dataset, n), dataset, "r1")
        store.replace_dataset(db, dataset, {"agreement": table})
    assert _types(db, "agreement")["tost_equivalent"] == "BOOLEAN"
    read = store.query(db, "SELECT dataset, tost_equivalent FROM metrics.agreement ORDER BY dataset")
    shown = {(r.dataset, cell(r.tost_equivalent, "tost_equivalent")) for r in read.itertuples()}
    assert shown == {("pilot", "–"), ("main", "yes")}
    # each measure's two rows say their margin, computed or not: the pilot's had been identical twins
    margins = store.query(
        db, "SELECT dataset, tost_margin FROM metrics.agreement ORDER BY dataset, tost_margin"
    )
    assert list(margins.itertuples(index=False, name=None)) == [
        ("main", 0.05), ("main", 0.10), ("pilot", 0.05), ("pilot", 0.10)
    ]  # fmt: skip

    # a database written before: the DOUBLE column is turned back into yes / no
    old = tmp_path / "old.duckdb"
    store.replace_dataset(
        old, "pilot", {"agreement": pd.DataFrame({"dataset": ["pilot"], "tost_equivalent": [np.nan]})}
    )
    store.replace_dataset(
        old, "main", {"agreement": pd.DataFrame({"dataset": ["main"], "tost_equivalent": [1.0]})}
    )
    assert _types(old, "agreement")["tost_equivalent"] == "DOUBLE"
    table, _ = agreement_with_experts(rows("main", 5), "main", "r2")
    store.replace_dataset(old, "main", {"agreement": table})
    assert _types(old, "agreement")["tost_equivalent"] == "BOOLEAN"
