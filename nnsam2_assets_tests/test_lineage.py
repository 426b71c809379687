"""The asset graph tells the truth: every edge is a real read, and every read of another asset's output is an
edge. Each asset's own domain call runs with its file and database reads recorded; the owners of what it read
must be exactly the asset's declared dependencies."""

from __future__ import annotations

import builtins
import contextlib
import re
import shutil
from pathlib import Path

import dagster as dg
import duckdb
import pandas as pd
import pytest
import SimpleITK as sitk

from nnsam2_assets.core.layout import DUCKDB_FILE
from nnsam2_assets.definitions import defs
from nnsam2_assets.metrics.store import SCHEMA, TABLES
from nnsam2_assets.pipeline import PHASES
from nnsam2_assets.refinement import stage_labels
from nnsam2_assets.refinement.corrections import record_corrections
from nnsam2_assets.refinement.settings import RefinementConfig
from nnsam2_assets.testing import direct
from nnsam2_assets.testing.cohorts import write_tiny_dataset

# the DuckDB tables each asset writes (scan_metrics owns every table but the agreement's)
TABLE_OWNER = {t: ("agreement" if t == "agreement" else "scan_metrics") for t in TABLES}


class Recorder:
    """Which files under the storage root, and which metrics tables, the code under test reads."""

    def __init__(self, storage: Path):
        self.storage = storage.resolve()
        self.paths: set[Path] = set()
        self.tables: set[str] = set()

    def file(self, path) -> None:
        with contextlib.suppress(TypeError, ValueError):  # file descriptors and the like
            self.paths.add(Path(path).resolve())

    def owners(self) -> set[str]:
        """The asset that owns each file read (None for the nnU-Net working folders and other files)."""
        out = {TABLE_OWNER[t] for t in self.tables}
        for path in self.paths:
            try:
                parts = path.relative_to(self.storage).parts
            except ValueError:
                continue  # the user's data root: not an asset's output
            if parts[0] == "datasets" and len(parts) > 2:
                out.add(parts[2])
            elif parts[0] == "models" and len(parts) > 1:
                out.add(f"nnunet_{parts[1]}")
        return out


class RecordingConnection:
    """A DuckDB connection that records the metrics tables its SELECT statements read."""

    def __init__(self, con, recorder: Recorder):
        self._con, self._recorder = con, recorder

    def execute(self, sql: str, *args):
        if sql.lstrip().upper().startswith("SELECT"):
            self._recorder.tables |= set(re.findall(rf"\b{SCHEMA}\.(\w+)", sql))
        return self._con.execute(sql, *args)

    def __getattr__(self, name):
        return getattr(self._con, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._con.close()


@pytest.fixture
def recorder(tmp_path, monkeypatch) -> Recorder:
    rec = Recorder(tmp_path / "storage")
    read_image, read_parquet, read_csv = sitk.ReadImage, pd.read_parquet, pd.read_csv
    read_text, read_bytes, open_ = Path.read_text, Path.read_bytes, builtins.open
    connect = duckdb.connect

    def recording(real):
        def wrapper(*args, **kwargs):
            rec.file(args[0])
            return real(*args, **kwargs)

        return wrapper

    def recording_open(file, mode="r", *args, **kwargs):
        if "r" in mode and not any(m in mode for m in "wax+"):
            rec.file(file)
        return open_(file, mode, *args, **kwargs)

    monkeypatch.setattr(sitk, "ReadImage", recording(read_image))
    monkeypatch.setattr(pd, "read_parquet", recording(read_parquet))
    monkeypatch.setattr(pd, "read_csv", recording(read_csv))
    monkeypatch.setattr(Path, "read_text", recording(read_text))
    monkeypatch.setattr(Path, "read_bytes", recording(read_bytes))
    monkeypatch.setattr(builtins, "open", recording_open)
    monkeypatch.setattr(direct.duckdb, "connect", lambda *a, **k: RecordingConnection(connect(*a, **k), rec))
    return rec


def test_every_edge_is_a_real_read_and_every_read_is_an_edge(tmp_path, recorder, monkeypatch):
    data, storage = tmp_path / "data", tmp_path / "storage"
    folder = write_tiny_dataset(data, "ds", 2, seed=1)
    # a user's correction of the second scan (its expert labels, in our class ids): recorded between the
    # per-dataset phase and the models, as the runner and the new-data sensor do
    scan = sorted(p.name.removesuffix(".nii.gz") for p in (folder / "experts").glob("*.nii.gz"))[-1]
    (folder / "corrections").mkdir()
    shutil.copy(folder / "experts" / f"{scan}.nii.gz", folder / "corrections" / f"{scan}.nii.gz")
    run = direct.DirectRun(data, storage, ["ds"], RefinementConfig(num_epochs=1, iterations_per_epoch=2))
    graph = defs().resolve_asset_graph()
    assert set(direct.STEPS) == {a for phase in PHASES for a in phase.assets}
    seen = {}
    for phase in PHASES:
        for asset in phase.assets:
            recorder.paths.clear()
            recorder.tables.clear()
            direct.STEPS[asset](run, "ds" if phase.per_dataset else None)
            seen[asset] = recorder.owners() - {asset}
        if phase is PHASES[0]:
            assert record_corrections(run.spec("ds"), run.layout("ds")).changed
    # where a later stage's selection leaves it nothing to learn (no previous prediction agrees with its
    # reference, no exact label), it learns the pseudo-labels as stage 1 does: that read is an edge too
    select = stage_labels.stage_labels

    def nothing_agrees(stage, pool, root, rule):
        selection, labels = select(stage, pool, root, rule)
        return selection, labels if stage == "stage1" else {}

    monkeypatch.setattr(stage_labels, "stage_labels", nothing_agrees)
    for stage in ("stage2", "stage3"):
        recorder.paths.clear()
        recorder.tables.clear()
        direct.STEPS[f"nnunet_{stage}"](run, None)
        seen[f"nnunet_{stage}"] |= recorder.owners() - {f"nnunet_{stage}"}
    declared = {
        asset: {p.to_user_string() for p in graph.get(dg.AssetKey(asset)).parent_keys} for asset in seen
    }
    assert seen == declared
    assert (storage / DUCKDB_FILE).exists()  # the metrics were written, so the agreement read real rows
