"""Hostile inputs, one dataset holding them all: each bad file is refused or noted with a message that names
it, and the good scans of the same dataset run the whole per-dataset chain (ingest to pseudo-labels).

A second run after one processed scan became unreadable checks that its earlier outputs are removed.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from nnsam2_assets.core.layout import ALLOWED_ROOTS_ENV, DatasetLayout
from nnsam2_assets.core.storage import sha256_file
from nnsam2_assets.ingest.convention import load_dataset
from nnsam2_assets.ingest.scans import read_manifest
from nnsam2_assets.pipeline import PER_DATASET
from nnsam2_assets.testing.cohorts import write_tiny_dataset
from nnsam2_assets.testing.direct import STEPS, DirectRun

NAME = "hostile"
GOOD = ["subj00", "subj01", "subj02"]
LONG_ID = "a" * 200
# scans that are accepted (and so propagated) besides the good ones
ACCEPTED = ["oblique20", "permuted", "linked", "misaligned"]


@dataclass
class Runs:
    data: Path
    store: Path
    outside: Path
    first: pd.DataFrame  # manifest after the first run
    second: pd.DataFrame  # after subj02 was truncated
    digests: dict[str, str]  # the other scans' propagated masks after the first run

    @property
    def folder(self) -> Path:
        return self.data / NAME

    @property
    def layout(self) -> DatasetLayout:
        return DatasetLayout(self.store, NAME)


def _read(path: Path) -> sitk.Image:
    return sitk.ReadImage(str(path))


def _write(img: sitk.Image, path: Path) -> None:
    sitk.WriteImage(img, str(path), useCompression=True)


def _copy_pair(scans: Path, src: str, dst: str) -> None:
    for part in ("water", "fat"):
        shutil.copy(scans / f"{src}_{part}.nii.gz", scans / f"{dst}_{part}.nii.gz")


def _rotated_about_x(img: sitk.Image, degrees: float) -> sitk.Image:
    t = np.radians(degrees)
    rot = np.array([[1, 0, 0], [0, np.cos(t), -np.sin(t)], [0, np.sin(t), np.cos(t)]])
    out = sitk.Image(img)
    out.SetDirection(tuple((rot @ np.array(img.GetDirection()).reshape(3, 3)).ravel()))
    return out


def _sagittal(img: sitk.Image) -> sitk.Image:
    """The same voxels declared as a 2-D sagittal stack: i along A/P, j along S/I, k (the 13 slices) along L/R."""
    out = sitk.Image(img)
    out.SetDirection((0, 0, 1, 1, 0, 0, 0, 1, 0))
    return out


def _with_nan(img: sitk.Image, n: int) -> sitk.Image:
    arr = sitk.GetArrayFromImage(sitk.Cast(img, sitk.sitkFloat32))
    arr.reshape(-1)[np.linspace(0, arr.size - 1, n).astype(int)] = np.nan
    out = sitk.GetImageFromArray(arr)
    out.CopyInformation(img)
    return out


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])


def _build(data: Path, outside: Path) -> None:
    folder = write_tiny_dataset(data, NAME, n_scans=3, seed=11)
    scans, experts = folder / "scans", folder / "experts"
    water = _read(scans / "subj01_water.nii.gz")
    fat = _read(scans / "subj01_fat.nii.gz")
    copies = {
        "truncated": None,
        "nanwater": None,
        "nanfat": None,
        "zerofat": None,
        "sagittal": None,
        "oblique35": None,
        "oblique20": None,
        "permuted": None,
        "misaligned": None,
        "regtwo": None,
        "regempty": None,
        "regfloat": None,
        "regdup": None,
        "regrange": None,
    }
    for scan_id in copies:
        _copy_pair(scans, "subj01", scan_id)
    _truncate(scans / "truncated_water.nii.gz")
    _write(_with_nan(water, 100), scans / "nanwater_water.nii.gz")
    _write(_with_nan(fat, 100), scans / "nanfat_fat.nii.gz")
    _write(fat * 0, scans / "zerofat_fat.nii.gz")
    _write(_sagittal(water), scans / "sagittal_water.nii.gz")
    _write(_sagittal(fat), scans / "sagittal_fat.nii.gz")
    for angle in (35, 20):
        _write(_rotated_about_x(water, angle), scans / f"oblique{angle}_water.nii.gz")
        _write(_rotated_about_x(fat, angle), scans / f"oblique{angle}_fat.nii.gz")
    _write(sitk.PermuteAxes(water, [2, 0, 1]), scans / "permuted_water.nii.gz")
    _write(sitk.PermuteAxes(fat, [2, 0, 1]), scans / "permuted_fat.nii.gz")
    expert = _read(experts / "subj01.nii.gz")
    expert.SetOrigin(tuple(o + 5000.0 for o in expert.GetOrigin()))
    _write(expert, experts / "misaligned.nii.gz")
    # symlinks: outside the data root, to a system file, and inside the data root (allowed)
    outside.mkdir(parents=True)
    shutil.copy(scans / "subj01_water.nii.gz", outside / "escape_water.nii.gz")
    (scans / "escape_water.nii.gz").symlink_to(outside / "escape_water.nii.gz")
    shutil.copy(scans / "subj01_fat.nii.gz", scans / "escape_fat.nii.gz")
    (scans / "passwd_water.nii.gz").symlink_to("/etc/passwd")
    shutil.copy(scans / "subj01_fat.nii.gz", scans / "passwd_fat.nii.gz")
    library = data / "_library"
    library.mkdir()
    shutil.copy(scans / "subj01_water.nii.gz", library / "linked_water.nii.gz")
    (scans / "linked_water.nii.gz").symlink_to(library / "linked_water.nii.gz")
    shutil.copy(scans / "subj01_fat.nii.gz", scans / "linked_fat.nii.gz")
    # names that cannot be scan ids, and a fat image without its water image
    _copy_pair(scans, "subj01", "s\u00fcbj")
    _copy_pair(scans, "subj01", LONG_ID)
    shutil.copy(scans / "subj01_fat.nii.gz", scans / "lonely_fat.nii.gz")
    # regions.csv: subj01's row for every copy, then the bad rows
    regions = pd.read_csv(folder / "regions.csv")
    first, last = regions.set_index("scan").loc["subj01", ["first_slice", "last_slice"]]
    rows = [f"{s},{first},{last}" for s in copies if not s.startswith("reg") and s != "permuted"]
    rows += [f"linked,{first},{last}", f"escape,{first},{last}"]
    rows += [
        f"regtwo,two,{last}",
        f"regempty,,{last}",
        f"regfloat,{first}.9,{last}",
        f"regdup,{first},{last}",
        f"regdup,{first},{last}",
        f"regrange,{first},999",
        f"ghost,{first},{last}",
    ]
    with open(folder / "regions.csv", "a") as fh:
        fh.write("\n".join(rows) + "\n")


def _run_chain(data: Path, store: Path) -> pd.DataFrame:
    run = DirectRun(data, store, [NAME])
    for asset in PER_DATASET:
        STEPS[asset](run, NAME)
    return read_manifest(run.layout(NAME))


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Runs:
    root = tmp_path_factory.mktemp("hostile")
    data, store, outside = root / "data", root / "store", root / "elsewhere"
    _build(data, outside)
    first = _run_chain(data, store)
    layout = DatasetLayout(store, NAME)
    digests = {s: sha256_file(layout.masks(s)) for s in ["subj00", "subj01", *ACCEPTED]}
    _truncate(data / NAME / "scans" / "subj02_water.nii.gz")
    second = _run_chain(data, store)
    return Runs(data, store, outside, first, second, digests)


def _error(runs: Runs, scan: str) -> str:
    row = runs.second.loc[scan]
    assert row.status == "error", (scan, row.to_dict())
    return str(row.error)


def test_the_good_scans_ran_the_whole_chain(runs):
    ok = set(runs.second.index[runs.second.status == "ok"])
    assert ok == {"subj00", "subj01", *ACCEPTED}
    for scan in ok:
        assert runs.layout.masks(scan).exists() and runs.layout.pseudo_label(scan).exists(), scan
        assert sha256_file(runs.layout.masks(scan)) == runs.digests[scan], f"{scan} changed on the rerun"
    selection = pd.read_parquet(runs.layout.pseudo_selection)
    assert set(selection.scan) == ok


def test_a_truncated_gzip_is_refused(runs):  # item 2
    path = runs.folder / "scans" / "truncated_water.nii.gz"
    assert _error(runs, "truncated").startswith(f"{path}: truncated or corrupt gzip stream")
    assert not runs.layout.scan_image("truncated").exists()


def test_nan_voxels_and_a_constant_fat_image_are_refused(runs):  # item 3
    scans = runs.folder / "scans"
    nan_water, nan_fat = _error(runs, "nanwater"), _error(runs, "nanfat")
    assert (
        nan_water
        == f"{scans / 'nanwater_water.nii.gz'}: 100 NaN or infinite voxels in the file's data "
        + ("(the reader would turn them into 0)")
    )
    assert nan_fat.startswith(f"{scans / 'nanfat_fat.nii.gz'}: 100 NaN or infinite voxels")
    assert _error(runs, "zerofat").startswith(f"{scans / 'zerofat_fat.nii.gz'}: image is constant")


def test_non_axial_scans_are_refused_and_oblique_ones_noted(runs):  # item 4
    scans = runs.folder / "scans"
    sagittal = _error(runs, "sagittal")
    n_slices = _read(scans / "subj01_water.nii.gz").GetSize()[2]  # the stack's slices become its width
    assert sagittal.startswith(
        f"{scans / 'sagittal_water.nii.gz'}: the axial plane is only 64x{n_slices} voxels"
    )
    assert "direction" in sagittal and "cannot be segmented axially" in sagittal
    oblique = _error(runs, "oblique35")
    assert oblique.startswith(f"{scans / 'oblique35_water.nii.gz'}: slice normal is 35 degrees")
    noted = runs.second.loc["oblique20"]
    assert noted.status == "ok" and "oblique acquisition: slice normal 20 degrees" in noted.warnings
    permuted = runs.second.loc["permuted"]  # a volume stored in another index order is plain axial anatomy
    # its region is found (no regions.csv row); the permutation itself raises nothing
    assert permuted.status == "ok" and permuted.region_source == "found"
    assert not permuted.warnings or permuted.warnings.startswith("found region")


def test_symlinks_stay_inside_the_data_root(runs):  # item 6
    scans = runs.folder / "scans"
    escape = _error(runs, "escape")
    assert escape.startswith(f"{scans / 'escape_water.nii.gz'}: resolves to {runs.outside.resolve()}")
    assert "outside the data root" in escape and ALLOWED_ROOTS_ENV in escape
    passwd = _error(runs, "passwd")
    assert passwd.startswith(
        f"{scans / 'passwd_water.nii.gz'}: resolves to /etc/passwd, outside the data root"
    )
    assert runs.second.loc["linked", "status"] == "ok"  # a link that stays inside the data root is allowed


def test_an_allowed_root_admits_the_outside_file(runs, monkeypatch):  # item 6, the documented setting
    monkeypatch.setenv(
        ALLOWED_ROOTS_ENV, os.pathsep.join([os.environ.get(ALLOWED_ROOTS_ENV, ""), str(runs.outside)])
    )
    spec = load_dataset(runs.data, NAME)
    assert "escape" in spec.scans and "passwd" in spec.excluded


def test_regions_csv_is_strict_and_a_bad_row_excludes_only_its_scan(runs):  # item 7
    csv = runs.folder / "regions.csv"
    lines = csv.read_text().splitlines()

    def row(scan: str) -> int:
        return 1 + next(i for i, line in enumerate(lines) if line.startswith(f"{scan},"))

    assert (
        _error(runs, "regtwo")
        == f"{csv} row {row('regtwo')}, column first_slice: 'two' is not an integer slice index"
    )
    assert _error(runs, "regempty") == f"{csv} row {row('regempty')}, column first_slice: empty"
    assert "column first_slice" in _error(runs, "regfloat") and ".9' is not an integer" in _error(
        runs, "regfloat"
    )
    dup = row("regdup")
    assert (
        _error(runs, "regdup")
        == f"{csv} rows {dup} and {dup + 1}: two regions for scan 'regdup'; keep one row"
    )
    out_of_range = _error(runs, "regrange")
    assert out_of_range.startswith(f"{csv}: row {row('regrange')}, columns first_slice/last_slice: slices")
    assert "999" in out_of_range and "regrange_water.nii.gz" in out_of_range
    spec = load_dataset(runs.data, NAME)
    assert any(f"row {row('ghost')}: no scan named 'ghost'" in w for w in spec.warnings)


def test_bad_names_and_bad_expert_files_exclude_only_what_they_must(runs):  # item 8
    assert "invalid scan id 's\u00fcbj'" in _error(runs, "s\u00fcbj")
    assert f"invalid scan id '{LONG_ID}'" in _error(runs, LONG_ID)
    misaligned = runs.second.loc["misaligned"]
    assert misaligned.status == "ok" and not misaligned.has_expert
    expert = runs.folder / "experts" / "misaligned.nii.gz"
    assert f"expert labels ignored: {expert}: label volume does not overlap the scan" in misaligned.warnings
    assert runs.layout.masks("misaligned").exists()


def test_a_scan_that_becomes_unreadable_loses_its_outputs(runs):  # item 10
    assert runs.first.loc["subj02", "status"] == "ok"
    assert "truncated or corrupt gzip stream" in _error(runs, "subj02")
    layout = runs.layout
    for path in (layout.scan_image("subj02"), layout.scan_fat("subj02"), layout.scan_expert("subj02")):
        assert not path.exists(), path
    for path in (layout.masks("subj02"), layout.confidence("subj02"), layout.pseudo_label("subj02")):
        assert not path.exists(), path
    assert not list(layout.base.rglob("_keys/subj02.*"))


def test_an_orphan_fat_image_is_reported(runs):  # item 10
    lonely = runs.folder / "scans" / "lonely_fat.nii.gz"
    assert _error(runs, "lonely") == f"{lonely}: fat image without a matching lonely_water image"
