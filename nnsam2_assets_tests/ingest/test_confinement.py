"""Every file a dataset names is read only from under the data root (or an allowed root): the description,
an expert's labels and a user's correction too, not only the scans, annotation and regions.csv."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest

from nnsam2_assets.core.layout import DatasetLayout
from nnsam2_assets.ingest.convention import load_dataset
from nnsam2_assets.ingest.errors import DatasetError
from nnsam2_assets.ingest.scans import ingest_scans
from nnsam2_assets.refinement.corrections import record_corrections
from nnsam2_assets.testing.cohorts import write_tiny_dataset


def _link_out(path: Path, outside: Path) -> Path:
    """Move ``path`` out of the data root and leave a symlink to it in its place."""
    outside.mkdir(parents=True, exist_ok=True)
    target = outside / path.name
    shutil.move(path, target)
    path.symlink_to(target)
    return target


def test_a_description_linked_out_of_the_data_root_is_refused(tmp_path):
    folder = write_tiny_dataset(tmp_path / "data", "ds", 2)
    _link_out(folder / "dataset.yaml", tmp_path / "outside")
    with pytest.raises(DatasetError, match=r"dataset\.yaml: resolves to .*outside the data root"):
        load_dataset(tmp_path / "data", "ds")


def test_expert_labels_linked_out_are_not_even_hashed(tmp_path, monkeypatch):
    """The refusal came after the file had been read whole for the cache key: a link to a huge or a
    never-ending file (a FIFO, a device) stalled the dataset's ingest."""
    from nnsam2_assets.ingest import scans

    data = tmp_path / "data"
    folder = write_tiny_dataset(data, "ds", 2)
    outside = _link_out(folder / "experts" / "subj01.nii.gz", tmp_path / "outside")
    read, hash_path = [], scans.sha256_path
    monkeypatch.setattr(
        scans, "sha256_path", lambda path: read.append(Path(path).resolve()) or hash_path(path)
    )
    ingest_scans(load_dataset(data, "ds"), DatasetLayout(tmp_path / "storage", "ds"))
    assert read and outside.resolve() not in read


def test_allowing_the_expert_labels_root_reads_them_on_the_next_run(tmp_path, monkeypatch):
    """The ingest cache's file stats did not say whether the expert file was readable: after the user listed
    its folder in NNSAM2_ALLOWED_ROOTS, as the warning told them to, the rerun kept the scan without expert
    labels and repeated the warning, until the file itself was touched. Removing the root works alike."""
    from nnsam2_assets.core.layout import ALLOWED_ROOTS_ENV

    data = tmp_path / "data"
    folder = write_tiny_dataset(data, "ds", 2)
    outside = _link_out(folder / "experts" / "subj01.nii.gz", tmp_path / "outside")
    layout = DatasetLayout(tmp_path / "storage", "ds")

    def has_expert() -> bool:
        report = ingest_scans(load_dataset(data, "ds"), layout)
        return bool(report.manifest.set_index("scan").loc["subj01", "has_expert"])

    assert not has_expert()
    monkeypatch.setenv(ALLOWED_ROOTS_ENV, str(outside.parent))
    assert has_expert()
    monkeypatch.delenv(ALLOWED_ROOTS_ENV)
    assert not has_expert() and not layout.scan_expert("subj01").exists()


def test_expert_labels_and_a_correction_linked_out_are_not_read(tmp_path, monkeypatch):
    data, storage = tmp_path / "data", tmp_path / "storage"
    folder = write_tiny_dataset(data, "ds", 2)
    expert = folder / "experts" / "subj01.nii.gz"
    _link_out(expert, tmp_path / "outside")
    spec, layout = load_dataset(data, "ds"), DatasetLayout(storage, "ds")
    ingest_scans(spec, layout)
    manifest = pd.read_parquet(layout.manifest).set_index("scan")
    assert manifest.loc["subj01", "status"] == "ok" and not manifest.loc["subj01", "has_expert"]
    assert f"expert labels ignored: {expert}: resolves to" in manifest.loc["subj01", "warnings"]
    assert manifest.loc["subj00", "has_expert"]

    (folder / "corrections").mkdir()
    correction = folder / "corrections" / "subj00.nii.gz"
    shutil.copy(folder / "experts" / "subj00.nii.gz", correction)
    _link_out(correction, tmp_path / "outside2")
    from nnsam2_assets.refinement import corrections

    hashed: list[Path] = []
    real_sha256 = corrections.sha256_file
    monkeypatch.setattr(
        corrections, "sha256_file", lambda path: hashed.append(Path(path)) or real_sha256(path)
    )
    recorded = record_corrections(load_dataset(data, "ds"), layout)
    assert not recorded.changed and "outside the data root" in recorded.refused["subj00"]
    assert correction not in hashed  # it had been read whole for its digest before it was refused


def test_a_folder_linked_out_of_the_data_root_is_refused_before_its_tree_is_walked(tmp_path, monkeypatch):
    """A scan folder linked to ``/`` (or ``/usr``) was refused only after every file below it was listed, on
    every sensor tick."""
    folder = write_tiny_dataset(tmp_path / "data", "ds", 2)
    outside = tmp_path / "outside"
    (outside / "deep" / "deeper").mkdir(parents=True)
    (folder / "scans" / "linked_water").symlink_to(outside, target_is_directory=True)
    walked: list[Path] = []
    real_rglob = Path.rglob

    def recording_rglob(self, pattern):
        walked.append(self)
        return real_rglob(self, pattern)

    monkeypatch.setattr(Path, "rglob", recording_rglob)
    spec = load_dataset(tmp_path / "data", "ds")
    assert "outside the data root" in spec.excluded["linked"]
    assert not any(p.resolve().is_relative_to(outside) for p in walked)
