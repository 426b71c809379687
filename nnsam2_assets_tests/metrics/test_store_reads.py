"""Reads of the metrics file retry on a fresh connection after an I/O error, within their wait, and then fail
with a message that names the file."""

from __future__ import annotations

import math

import duckdb
import pandas as pd
import pytest

from nnsam2_assets.metrics import store


class _FailingConnection:
    """A read-only connection whose queries raise the I/O error a reader met beside two writers."""

    def __init__(self, con) -> None:
        self._con = con

    def execute(self, *args, **kwargs):
        raise duckdb.IOException('IO Error: Could not read enough bytes from file "x.duckdb"')

    def close(self) -> None:
        self._con.close()


def _flaky_connect(monkeypatch, failures: int | None) -> list[bool]:
    """``duckdb.connect`` whose first ``failures`` read-only connections fail (None: all of them)."""
    real, opened = duckdb.connect, []

    def connect(path, read_only=False, config=None):
        con = real(path, read_only=read_only, config=config)
        opened.append(read_only)
        n_read = sum(opened)
        if read_only and (failures is None or n_read <= failures):
            return _FailingConnection(con)
        return con

    monkeypatch.setattr(store.duckdb, "connect", connect)
    return opened


def test_a_read_that_meets_an_io_error_is_retried_on_a_fresh_connection(tmp_path, monkeypatch):
    db = tmp_path / "nnsam2.duckdb"
    rows = pd.DataFrame({"dataset": "a", "scan": ["s0", "s1"], "volume_ml": [1.0, 2.0]})
    store.replace_dataset(db, "a", {"scan_metrics": rows})
    opened = _flaky_connect(monkeypatch, failures=2)
    df = store.query(db, "SELECT scan FROM metrics.scan_metrics ORDER BY scan", wait_s=math.inf)
    assert df.scan.tolist() == ["s0", "s1"]
    assert store.dataset_rows(db, "scan_metrics", "a").volume_ml.tolist() == [1.0, 2.0]
    assert opened.count(True) == 4  # two failed connections, then one per read


def test_a_read_that_keeps_failing_names_the_file_after_its_wait(tmp_path, monkeypatch):
    db = tmp_path / "nnsam2.duckdb"
    store.replace_dataset(db, "a", {"scan_metrics": pd.DataFrame({"dataset": ["a"], "scan": ["s0"]})})
    _flaky_connect(monkeypatch, failures=None)
    with pytest.raises(store.MetricsDBError, match=r"nnsam2\.duckdb: cannot read the metrics database"):
        store.query(db, "SELECT * FROM metrics.scan_metrics", wait_s=0.5)
