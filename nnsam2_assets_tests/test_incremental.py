"""The per-dataset chain is incremental: a new scan costs one scan's work and reads, whatever N is, and the
incremental result equals a from-scratch run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from nnsam2_assets.core.layout import DatasetLayout
from nnsam2_assets.ingest.convention import load_dataset
from nnsam2_assets.ingest.scans import ingest_scans, ok_scans
from nnsam2_assets.pipeline import PER_DATASET
from nnsam2_assets.testing.cohorts import hide_scan, restore_scan, write_tiny_dataset
from nnsam2_assets.testing.direct import STEPS, DirectRun


def _chain(data: Path, storage: Path, name: str) -> dict[str, int]:
    """The per-dataset chain through the assets' own domain calls; how many scans two steps recomputed."""
    run = DirectRun(data, storage, [name])
    reports = {asset: STEPS[asset](run, name) for asset in PER_DATASET}
    return {"scans": reports["scans"].computed, "masks": reports["propagated_masks"].computed}


@pytest.fixture
def count_reads(monkeypatch):
    calls: list[str] = []
    real = sitk.ReadImage

    def counting(path, *args, **kwargs):
        calls.append(str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(sitk, "ReadImage", counting)
    return calls


def _add_one(tmp: Path, n: int, calls: list[str]) -> tuple[dict, int, Path, Path]:
    data, storage = tmp / f"data{n}", tmp / f"storage{n}"
    folder = write_tiny_dataset(data, "ds", n + 1, seed=3)
    new = f"subj{n:02d}"
    hide_scan(folder, new, tmp / f"aside{n}")
    _chain(data, storage, "ds")
    restore_scan(folder, new, tmp / f"aside{n}")
    calls.clear()
    done = _chain(data, storage, "ds")
    return done, len(calls), data, storage


def test_new_scan_costs_one_scan_whatever_n(tmp_path, count_reads):
    done2, reads2, _, _ = _add_one(tmp_path, 2, count_reads)
    done5, reads5, data5, storage5 = _add_one(tmp_path, 5, count_reads)
    assert done2 == done5 == {"scans": 1, "masks": 1}
    assert reads5 == reads2, f"image reads grow with N: {reads2} at N=2, {reads5} at N=5"
    # an unchanged rerun recomputes nothing
    assert _chain(data5, storage5, "ds") == {"scans": 0, "masks": 0}


def test_incremental_result_equals_a_fresh_run(tmp_path, count_reads):
    _, _, data, storage = _add_one(tmp_path, 3, count_reads)
    fresh = tmp_path / "fresh"
    _chain(data, fresh, "ds")
    a, b = DatasetLayout(storage, "ds"), DatasetLayout(fresh, "ds")
    sel_a, sel_b = pd.read_parquet(a.pseudo_selection), pd.read_parquet(b.pseudo_selection)
    pd.testing.assert_frame_equal(sel_a, sel_b)
    for scan in ok_scans(a):
        for path_a, path_b in ((a.masks(scan), b.masks(scan)), (a.pseudo_label(scan), b.pseudo_label(scan))):
            assert np.array_equal(
                sitk.GetArrayFromImage(sitk.ReadImage(str(path_a))),
                sitk.GetArrayFromImage(sitk.ReadImage(str(path_b))),
            ), path_a
    pd.testing.assert_frame_equal(pd.read_csv(a.ranking), pd.read_csv(b.ranking))


def test_a_touched_but_unchanged_source_is_rehashed_not_reingested(tmp_path):
    data, storage = tmp_path / "data", tmp_path / "storage"
    folder = write_tiny_dataset(data, "ds", 2, seed=4)
    _chain(data, storage, "ds")
    source = next((folder / "scans").glob("subj01*"))
    source.write_bytes(source.read_bytes())  # new mtime and inode, same content
    spec, layout = load_dataset(data, "ds"), DatasetLayout(storage, "ds")
    assert ingest_scans(spec, layout).computed == 0
    img = sitk.ReadImage(str(source))
    arr = sitk.GetArrayFromImage(img)
    arr.flat[0] += 7  # same size, different content
    out = sitk.GetImageFromArray(arr)
    out.CopyInformation(img)
    sitk.WriteImage(out, str(source))
    assert ingest_scans(spec, layout).computed == 1


def test_a_new_ingest_version_reprepares_scans_whose_files_did_not_change(tmp_path, monkeypatch):
    from nnsam2_assets.ingest import scans

    data, storage = tmp_path / "data", tmp_path / "storage"
    write_tiny_dataset(data, "ds", 2, seed=4)
    spec, layout = load_dataset(data, "ds"), DatasetLayout(storage, "ds")
    assert ingest_scans(spec, layout).computed == 2
    assert ingest_scans(spec, layout).computed == 0
    monkeypatch.setattr(scans, "VERSION", scans.VERSION + "-next")
    assert ingest_scans(spec, layout).computed == 2  # the files' stat alone no longer vouches for them


def test_an_in_place_rewrite_that_keeps_size_mtime_and_inode_is_reingested(tmp_path):
    """`cp -p` / `rsync -t` over an existing file keep size, mtime and inode; only ctime tells."""
    import os

    data, storage = tmp_path / "data", tmp_path / "storage"
    folder = write_tiny_dataset(data, "ds", 2, seed=5)
    _chain(data, storage, "ds")
    source = next((folder / "scans").glob("subj01*.nii.gz"))
    before = os.stat(source)
    with open(source, "r+b") as fh:  # the gzip header's MTIME field: same size, different bytes
        fh.seek(4)
        fh.write(b"\x01\x02\x03\x04")
    os.utime(source, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = os.stat(source)
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (
        before.st_size,
        before.st_mtime_ns,
        before.st_ino,
    )
    spec, layout = load_dataset(data, "ds"), DatasetLayout(storage, "ds")
    assert ingest_scans(spec, layout).computed == 1


def _rewrite(path: Path, change) -> None:
    img = sitk.ReadImage(str(path))
    out = change(img)
    sitk.WriteImage(out, str(path))


def test_a_changed_reference_image_repropagates_every_scan(tmp_path):
    """Every target is registered to the reference's image: new content there (a re-export with another bias
    correction) re-propagates them all, though their own files and the annotation did not change."""
    data, storage = tmp_path / "data", tmp_path / "storage"
    folder = write_tiny_dataset(data, "ds", 3, seed=4)
    assert _chain(data, storage, "ds") == {"scans": 3, "masks": 3}
    reference = load_dataset(data, "ds").reference

    def brighter_to_the_left(img: sitk.Image) -> sitk.Image:
        arr = sitk.GetArrayFromImage(img).astype(np.float32)
        arr *= np.linspace(0.8, 1.2, arr.shape[2], dtype=np.float32)  # a smooth bias field
        out = sitk.GetImageFromArray(arr)
        out.CopyInformation(img)
        return sitk.Cast(out, img.GetPixelID())

    for part in ("water", "fat"):
        _rewrite(folder / "scans" / f"{reference}_{part}.nii.gz", brighter_to_the_left)
    assert _chain(data, storage, "ds") == {"scans": 1, "masks": 3}


def test_a_scan_moved_in_space_gets_its_masks_on_its_new_grid(tmp_path):
    """The registration works slice by slice, so a scan whose origin moved propagates to the same voxels;
    its mask file must still move with it."""
    data, storage = tmp_path / "data", tmp_path / "storage"
    folder = write_tiny_dataset(data, "ds", 2, seed=4)
    _chain(data, storage, "ds")
    scan = next(s for s in ("subj00", "subj01") if s != load_dataset(data, "ds").reference)

    def moved(img: sitk.Image) -> sitk.Image:
        img.SetOrigin(tuple(np.add(img.GetOrigin(), (0.0, 0.0, 20.0))))
        return img

    for path in (*(folder / "scans").glob(f"{scan}_*.nii.gz"), folder / "experts" / f"{scan}.nii.gz"):
        _rewrite(path, moved)
    assert _chain(data, storage, "ds") == {"scans": 1, "masks": 1}
    layout = DatasetLayout(storage, "ds")
    image, masks = sitk.ReadImage(str(layout.scan_image(scan))), sitk.ReadImage(str(layout.masks(scan)))
    pseudo = sitk.ReadImage(str(layout.pseudo_label(scan)))
    assert np.allclose(masks.GetOrigin(), image.GetOrigin()) and np.allclose(
        pseudo.GetOrigin(), image.GetOrigin()
    )


def test_new_expert_labels_reach_the_slice_table_though_the_masks_stay(tmp_path):
    data, storage = tmp_path / "data", tmp_path / "storage"
    folder = write_tiny_dataset(data, "ds", 2, seed=4)
    _chain(data, storage, "ds")
    layout = DatasetLayout(storage, "ds")
    scan = next(s for s in ("subj00", "subj01") if s != load_dataset(data, "ds").reference)
    before = pd.read_parquet(layout.pseudo_selection).query("scan == @scan").expert_dice
    assert before.max() > 0.5

    def shifted(img: sitk.Image) -> sitk.Image:  # the expert's labels moved 6 pixels to the side
        arr = np.roll(sitk.GetArrayFromImage(img), 6, axis=2)
        out = sitk.GetImageFromArray(arr)
        out.CopyInformation(img)
        return out

    _rewrite(folder / "experts" / f"{scan}.nii.gz", shifted)
    _chain(data, storage, "ds")
    after = pd.read_parquet(layout.pseudo_selection).query("scan == @scan").expert_dice
    assert after.mean() < before.mean() - 0.1


def test_expert_labels_removed_from_the_dataset_leave_no_expert_numbers_behind(tmp_path):
    """The stored expert file outlived the user's: the scan was re-ingested without expert labels, yet every
    later step found the old file and kept comparing with labels the user had deleted."""
    data, storage = tmp_path / "data", tmp_path / "storage"
    folder = write_tiny_dataset(data, "ds", 2, seed=4)
    _chain(data, storage, "ds")
    layout = DatasetLayout(storage, "ds")
    scan = next(s for s in ("subj00", "subj01") if s != load_dataset(data, "ds").reference)
    assert pd.read_parquet(layout.pseudo_selection).query("scan == @scan").expert_dice.notna().all()

    (folder / "experts" / f"{scan}.nii.gz").unlink()
    _chain(data, storage, "ds")
    assert not layout.scan_expert(scan).exists()
    assert (
        not ingest_scans(load_dataset(data, "ds"), layout).manifest.set_index("scan").loc[scan, "has_expert"]
    )
    assert pd.read_parquet(layout.pseudo_selection).query("scan == @scan").expert_dice.isna().all()
