"""3D Slicer ``.seg.nrrd`` annotations and expert labels: mapping by segment name or label value, a file
cropped to its extent padded back onto the scan, clear errors, and the same masks as the NIfTI annotation."""

import numpy as np
import pytest
import SimpleITK as sitk
import yaml

from nnsam2_assets.core.imaging import ScanError, read_array
from nnsam2_assets.core.layout import DatasetLayout
from nnsam2_assets.demo.datasets import write_demo_dataset
from nnsam2_assets.ingest.convention import load_dataset
from nnsam2_assets.ingest.slicer import read_slicer_labels
from nnsam2_assets.refinement.settings import RefinementConfig
from nnsam2_assets.testing.direct import DirectRun, run_direct
from nnsam2_assets.testing.realdata import write_yaml

NAMES = {1: "ES right", 2: "MF right", 3: "MF left", 4: "ES left"}


def write_seg(labels: sitk.Image, path, names=NAMES, crop=True, layers=None, values=None) -> None:
    """Write labels the way Slicer does: cropped to the segments' extent, segments listed in the header."""
    arr = sitk.GetArrayFromImage(labels)
    image = labels
    if crop:
        zz, yy, xx = np.nonzero(arr)
        image = labels[
            int(xx.min()) : int(xx.max()) + 1,
            int(yy.min()) : int(yy.max()) + 1,
            int(zz.min()) : int(zz.max()) + 1,
        ]
    values = values or {k: k for k in names}
    out = sitk.GetImageFromArray(
        np.vectorize(lambda v: values.get(int(v), 0))(sitk.GetArrayFromImage(image)).astype(np.uint8)
    )
    out.CopyInformation(image)
    for i, (label, name) in enumerate(names.items()):
        out.SetMetaData(f"Segment{i}_Name", name)
        out.SetMetaData(f"Segment{i}_LabelValue", str(values[label]))
        out.SetMetaData(f"Segment{i}_Layer", str((layers or {}).get(label, 0)))
    sitk.WriteImage(out, str(path))


@pytest.fixture
def datasets(tmp_path):
    """The same small Dixon dataset twice: the annotation as NIfTI, and as a cropped .seg.nrrd mapped by
    segment name (with an expert file as .seg.nrrd mapped by label value)."""
    data = tmp_path / "data"
    nifti = write_demo_dataset(data, "nifti", "dixon", 2, 0, shape_yx=(64, 64))
    slicer = write_demo_dataset(data, "slicer", "dixon", 2, 0, shape_yx=(64, 64))
    write_seg(sitk.ReadImage(str(nifti / "annotation.nii.gz")), slicer / "annotation.seg.nrrd")
    (slicer / "annotation.nii.gz").unlink()
    expert = sorted((slicer / "experts").glob("*.nii.gz"))[0]
    write_seg(
        sitk.ReadImage(str(expert)),
        slicer / "experts" / expert.name.replace(".nii.gz", ".seg.nrrd"),
        names={1: "a", 2: "b", 3: "c", 4: "d"},
    )
    expert.unlink()
    cfg = yaml.safe_load((slicer / "dataset.yaml").read_text())
    classes = ("right_es", "right_mf", "left_mf", "left_es")
    # the annotation's segments map by name, the expert file's (names a..d) by label value
    cfg["label_map"] = dict(zip(NAMES.values(), classes, strict=True)) | dict(
        zip(NAMES, classes, strict=True)
    )
    write_yaml(slicer / "dataset.yaml", cfg)
    return data, tmp_path / "storage"


def test_a_seg_nrrd_annotation_gives_the_same_masks_as_the_nifti_one(datasets):
    """Both datasets end to end in one pool (the cheapest nnU-Net budget that trains all three stages): the
    same scans with the same annotation, once NIfTI and once .seg.nrrd, give the same files at every step,
    final masks included."""
    data, storage = datasets
    cheap = RefinementConfig(num_epochs=1, iterations_per_epoch=2)
    run_direct(DirectRun(data, storage, ["nifti", "slicer"], refinement=cheap))
    assert load_dataset(data, "slicer").annotation.name == "annotation.seg.nrrd"
    nifti, slicer = DatasetLayout(storage, "nifti"), DatasetLayout(storage, "slicer")
    np.testing.assert_array_equal(read_array(slicer.annotation), read_array(nifti.annotation))
    for scan in load_dataset(data, "nifti").scans:
        for path in ("scan_expert", "masks", "pseudo_label", "final_mask_canonical", "final_mask"):
            a, b = getattr(nifti, path)(scan), getattr(slicer, path)(scan)
            np.testing.assert_array_equal(read_array(b), read_array(a), err_msg=f"{scan} {path}")


def _labels(tmp_path):
    arr = np.zeros((6, 16, 16), np.uint8)
    arr[3, 4:8, 2:6], arr[3, 4:8, 10:14] = 1, 2
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((1.0, 1.0, 3.0))
    img.SetOrigin((5.0, -2.0, 30.0))
    return img


def test_a_cropped_segmentation_is_padded_onto_the_grid(tmp_path):
    grid = _labels(tmp_path)
    write_seg(grid, tmp_path / "a.seg.nrrd", names={1: "R", 2: "L"})
    assert sitk.ReadImage(str(tmp_path / "a.seg.nrrd")).GetSize() == (12, 4, 1)  # really cropped
    out = read_slicer_labels(tmp_path / "a.seg.nrrd", {}, {"R": 1, "L": 2}, grid=grid)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(out), sitk.GetArrayFromImage(grid))
    # mapped by label value when the names are not in the map
    write_seg(grid, tmp_path / "v.seg.nrrd", names={1: "x", 2: "y"}, values={1: 7, 2: 9})
    out = read_slicer_labels(tmp_path / "v.seg.nrrd", {7: 1, 9: 2}, {}, grid=grid)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(out), sitk.GetArrayFromImage(grid))


def test_bad_segmentations_get_clear_errors_naming_the_file(tmp_path):
    grid = _labels(tmp_path)
    path = tmp_path / "bad.seg.nrrd"
    write_seg(grid, path, names={1: "R", 2: "Lft"})
    with pytest.raises(
        ScanError, match=rf"{path}: segment 'Lft' \(label value 2\) is not in the dataset's label_map"
    ):
        read_slicer_labels(path, {}, {"R": 1, "L": 2}, grid=grid)
    write_seg(grid, path, names={1: "R", 2: "L"}, layers={2: 1})
    with pytest.raises(ScanError, match=rf"{path}: overlapping segments \(2 layers\)"):
        read_slicer_labels(path, {}, {"R": 1, "L": 2}, grid=grid)
    # a merge of files left both segments on one value: every R voxel had silently become L
    write_seg(grid, path, names={1: "R", 2: "L"}, values={1: 1, 2: 1})
    with pytest.raises(ScanError, match=rf"{path}: segments 'R' and 'L' share label value 1"):
        read_slicer_labels(path, {}, {"R": 1, "L": 2}, grid=grid)
    write_seg(grid, path, names={1: "R", 2: "L"})
    other = sitk.Image(grid)
    other.SetSpacing((1.0, 1.0, 2.5))
    with pytest.raises(ScanError, match=rf"{path}: spacing \(1.0, 1.0, 3.0\) differs from the scan's"):
        read_slicer_labels(path, {}, {"R": 1, "L": 2}, grid=other)
    shifted = sitk.Image(grid)
    shifted.SetOrigin((5.4, -2.0, 30.0))
    with pytest.raises(ScanError, match=rf"{path}: origin .* is not on a voxel of the scan's grid"):
        read_slicer_labels(path, {}, {"R": 1, "L": 2}, grid=shifted)
    turned = sitk.Image(grid)
    turned.SetDirection((-1, 0, 0, 0, 1, 0, 0, 0, 1))
    with pytest.raises(ScanError, match=rf"{path}: direction differs from the scan's"):
        read_slicer_labels(path, {}, {"R": 1, "L": 2}, grid=turned)
    plain = sitk.Image(grid)
    sitk.WriteImage(plain, str(path))
    with pytest.raises(ScanError, match=rf"{path}: no segments in the header"):
        read_slicer_labels(path, {}, {"R": 1, "L": 2}, grid=grid)
