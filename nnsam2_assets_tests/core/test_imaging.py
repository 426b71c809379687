from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from nnsam2_assets.core.imaging import (
    Geometry,
    ScanError,
    align_labels,
    crop_region,
    dicom_series_files,
    pair_dixon,
    read_image,
    read_source_image,
    to_canonical,
    to_original_grid,
)
from nnsam2_assets.testing.realdata import TS


def _volume(direction: str = "LPS", shape=(6, 5, 4)) -> sitk.Image:
    arr = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((1.0, 2.0, 3.0))
    img.SetOrigin((10.0, -5.0, 7.0))
    return sitk.DICOMOrient(img, direction) if direction != "LPS" else img


@pytest.mark.parametrize("orientation", ["RAS", "LAS", "RPI", "LPI", "SLP"])
def test_canonical_orientation_preserves_physical_positions(orientation):
    original = _volume(orientation)
    canonical = to_canonical(original)
    assert Geometry.of(canonical).orientation() == "LPS"
    assert np.allclose(canonical.GetDirection(), np.eye(3).ravel())
    # the same physical point carries the same value before and after
    for idx in [(0, 0, 0), (1, 2, 3)]:
        point = canonical.TransformIndexToPhysicalPoint(idx)
        back = original.TransformPhysicalPointToIndex(point)
        assert canonical[idx] == original[back]


@pytest.mark.parametrize("orientation", ["LPS", "LPI"])  # z feet-to-head and head-to-feet
def test_region_crop_accepts_either_index_order_and_shifts_origin(orientation):
    img = _volume(orientation)
    a = crop_region(img, 1, 3)
    b = crop_region(img, 3, 1)  # the reference's arr[L3_L4:L5_S1] was empty when z ran the other way
    assert a.GetSize()[2] == b.GetSize()[2] == 3
    assert np.array_equal(sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b))
    # the crop's first voxel sits where slice 1 sat in the full volume (reference bug: origin not shifted)
    assert np.allclose(a.GetOrigin(), img.TransformIndexToPhysicalPoint((0, 0, 1)))


def test_region_outside_volume_is_a_clear_error():
    with pytest.raises(ScanError, match=r"region slices 2\.\.9 outside the volume's 6 axial slices"):
        crop_region(_volume(), 2, 9, path="scan.nii.gz")


def test_mask_round_trip_to_original_grid():
    original = _volume("RAS")
    canonical = to_canonical(crop_region(original, 1, 4))
    mask = sitk.Cast(canonical > 50, sitk.sitkUInt8)
    back = to_original_grid(mask, original)
    assert back.GetSize() == original.GetSize()
    assert np.allclose(back.GetDirection(), original.GetDirection())
    assert np.allclose(back.GetOrigin(), original.GetOrigin())
    expected = np.zeros(sitk.GetArrayFromImage(original).shape, bool)
    arr = sitk.GetArrayFromImage(original)
    # axial axis of RAS is k; slices 1..4 of the original hold the crop
    expected[1:5] = arr[1:5] > 50
    assert np.array_equal(sitk.GetArrayFromImage(back).astype(bool), expected)


def test_dixon_pairing_by_array_index():
    water = _volume()
    fat = _volume()
    fat.SetOrigin((200.0, 150.0, 190.0))  # the real TUM fat image carries a different origin
    paired = pair_dixon(water, fat, "w.nii.gz", "f.nii.gz")
    assert paired.GetOrigin() == water.GetOrigin()
    wrong = sitk.Image([4, 5, 5], sitk.sitkFloat32)
    with pytest.raises(
        ScanError, match=r"f\.nii\.gz: Dixon fat shape \(4, 5, 5\) differs from water \(4, 5, 6\)"
    ):
        pair_dixon(water, wrong, "w.nii.gz", "f.nii.gz")
    wrong_spacing = _volume()
    wrong_spacing.SetSpacing((1.0, 2.0, 4.0))
    with pytest.raises(ScanError, match="spacing"):
        pair_dixon(water, wrong_spacing, "w.nii.gz", "f.nii.gz")


@pytest.mark.parametrize("fat_axes", ["RPS", "LAI", "PLS"])
def test_a_fat_image_stored_with_other_axes_pairs_with_the_same_anatomy(fat_axes):
    water = _volume()
    marker = np.zeros(sitk.GetArrayViewFromImage(water).shape, np.float32)
    marker[1, 2, 3] = 100.0  # one voxel at a known physical point
    fat = sitk.GetImageFromArray(marker)
    fat.CopyInformation(water)
    point = water.TransformIndexToPhysicalPoint((3, 2, 1))
    stored = sitk.DICOMOrient(fat, fat_axes)  # the same anatomy, the array flipped / permuted
    assert not np.allclose(stored.GetDirection(), water.GetDirection())
    paired = pair_dixon(water, stored, "w.nii.gz", "f.nii.gz")
    found = np.argwhere(sitk.GetArrayViewFromImage(paired) == 100.0)
    (z, y, x) = found[0]
    assert len(found) == 1 and np.allclose(
        paired.TransformIndexToPhysicalPoint((int(x), int(y), int(z))), point
    )
    oblique = sitk.Image(water)
    c, s_ = np.cos(0.3), np.sin(0.3)
    oblique.SetDirection((c, -s_, 0.0, s_, c, 0.0, 0.0, 0.0, 1.0))
    with pytest.raises(ScanError, match=r"f\.nii\.gz: Dixon fat direction .* is not the water's"):
        pair_dixon(water, oblique, "w.nii.gz", "f.nii.gz")


def test_unreadable_and_not_3d_files(tmp_path: Path):
    bad = tmp_path / "corrupt.nii.gz"
    bad.write_bytes(b"not a nifti at all")
    with pytest.raises(ScanError, match=r"corrupt\.nii\.gz: unreadable or corrupt image"):
        read_image(bad)
    flat = tmp_path / "flat.nii.gz"
    sitk.WriteImage(sitk.Image([8, 8], sitk.sitkFloat32), str(flat))
    with pytest.raises(ScanError, match=r"flat\.nii\.gz: expected a 3-D volume, got 2-D"):
        read_image(flat)
    with pytest.raises(ScanError, match="file not found"):
        read_image(tmp_path / "missing.nii.gz")
    empty_dir = tmp_path / "dicom"
    empty_dir.mkdir()
    with pytest.raises(ScanError, match="folder holds no DICOM series"):
        read_image(empty_dir)


def test_flipped_label_is_aligned_in_physical_space():
    image = _volume("LPS")
    label = sitk.Cast(image > 60, sitk.sitkUInt8)
    flipped = sitk.DICOMOrient(label, "LAS")  # y flipped, same physical content
    assert not np.array_equal(sitk.GetArrayFromImage(flipped), sitk.GetArrayFromImage(label))
    aligned = align_labels(flipped, image, "label.nii.gz")
    assert np.array_equal(sitk.GetArrayFromImage(aligned), sitk.GetArrayFromImage(label))
    far = sitk.Image(label)
    far.SetOrigin((1000.0, 1000.0, 1000.0))
    with pytest.raises(ScanError, match="does not overlap the scan in physical space"):
        align_labels(far, image, "label.nii.gz")


def _series_copy(
    tmp_path: Path, name: str, shift_mm_per_slice: tuple[float, float, float] = (0, 0, 0)
) -> Path:
    """The real CT series, each slice's position moved by ``shift_mm_per_slice`` times its index."""
    out = tmp_path / name
    out.mkdir()
    for k, source in enumerate(dicom_series_files(TS / "example_ct_dicom")):
        ds = pydicom.dcmread(source)
        ds.ImagePositionPatient = [
            float(p) + k * d for p, d in zip(ds.ImagePositionPatient, shift_mm_per_slice, strict=True)
        ]
        ds.save_as(out / f"slice{k:03d}.dcm")
    return out


def test_a_dicom_series_off_a_regular_grid_is_refused_naming_the_slice(tmp_path: Path):
    regular = read_image(_series_copy(tmp_path, "regular"))
    assert regular.GetSize() == (512, 512, 20)
    gapped = _series_copy(tmp_path, "gapped")
    (gapped / "slice007.dcm").unlink()  # one missing slice: the mean spacing misplaces the others
    with pytest.raises(ScanError, match=r"gapped: slice \d+ \(slice0\d\d\.dcm\) lies .* mm from where"):
        read_image(gapped)
    # the slices' positions drift sideways as a gantry tilt of about 14 degrees makes them (0.5 mm per 2 mm)
    sheared = _series_copy(tmp_path, "sheared", (0.0, 0.5, 0.0))
    with pytest.raises(ScanError, match="gantry-tilted series"):
        read_image(sheared)


def test_a_dicom_series_that_cannot_be_measured_is_refused_naming_the_file(tmp_path: Path):
    """A slice without a position switched the grid check off for the whole series (a missing slice then
    passed at 1 mm spacing); a series without Pixel Spacing was read as 1 x 1 mm. Every volume would be
    wrong without a word."""
    gapped = _series_copy(tmp_path, "gapped")
    (gapped / "slice007.dcm").unlink()
    ds = pydicom.dcmread(gapped / "slice003.dcm")
    del ds.ImagePositionPatient
    ds.save_as(gapped / "slice003.dcm")
    with pytest.raises(ScanError, match=r"slice003\.dcm: no Image Position \(Patient\)"):
        read_image(gapped)
    unmeasured = _series_copy(tmp_path, "unmeasured")
    for path in unmeasured.iterdir():
        ds = pydicom.dcmread(path)
        del ds.PixelSpacing
        ds.save_as(path)
    with pytest.raises(ScanError, match=r"slice000\.dcm: no Pixel Spacing"):
        read_image(unmeasured)


@pytest.mark.parametrize("cut_bytes", [10, 100_000])
def test_a_truncated_end_slice_of_a_dicom_series_is_refused_not_dropped(tmp_path: Path, cut_bytes: int):
    """The series reader passes over a file it cannot parse: a cut-off end slice left a volume one slice
    short, whose spacing and positions still agreed, and every volume measured on it was wrong."""
    series = _series_copy(tmp_path, "series")
    (series / "notes.txt").write_text("acquired on the second scanner\n")  # not DICOM: no slice missing
    assert read_image(series).GetSize() == (512, 512, 20)
    end = series / "slice000.dcm"
    with open(end, "r+b") as fh:
        fh.truncate(end.stat().st_size - cut_bytes)
    with pytest.raises(ScanError, match=r"slice000\.dcm: a DICOM file the series reader could not read"):
        read_image(series)


@pytest.mark.parametrize("bad", [float("nan"), 0.0, float("inf"), 1e30])
def test_a_voxel_size_that_cannot_be_one_is_refused(tmp_path: Path, bad: float):
    """SimpleITK reads a NaN, zero or infinite NIfTI slice thickness as 1 mm, and 1e30 mm passed as it was."""
    import nibabel as nib

    path = tmp_path / "scan.nii.gz"
    image = nib.Nifti1Image(np.ones((80, 80, 6), np.float32), np.diag([1.0, 1.0, 3.0, 1.0]))
    image.header["pixdim"][3] = bad
    nib.save(image, str(path))
    with pytest.raises(ScanError, match=r"scan\.nii\.gz: (header voxel sizes|voxel spacing)"):
        read_source_image(path)
