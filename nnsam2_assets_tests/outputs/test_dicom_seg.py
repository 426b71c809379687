"""DICOM Segmentation output on the real CT DICOM series: voxel-exact round trip, references, per-frame
geometry, empty frames omitted, coded segments; and no SEG for a NIfTI scan."""

from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from nnsam2_assets.core.imaging import ScanError, align_labels, dicom_series_files, read_image
from nnsam2_assets.core.labels import CLASSES_2, CLASSES_4, LATERALITY_CODES, MUSCLE_CODES
from nnsam2_assets.core.layout import DatasetLayout
from nnsam2_assets.ingest.convention import load_dataset
from nnsam2_assets.outputs.dicom_seg import read_dicom_seg, segment_descriptions, source_uid, write_dicom_seg
from nnsam2_assets.refinement.final_masks import write_on_original_grid
from nnsam2_assets.testing.realdata import TS, ct_dataset

SERIES = TS / "example_ct_dicom"


@pytest.fixture(scope="module")
def series_mask() -> sitk.Image:
    """TotalSegmentator's autochthon labels of the series as our 2-class mask, the lowest 3 slices emptied
    (as a region crop leaves them)."""
    image = read_image(SERIES)
    labels = sitk.ReadImage(str(TS / "example_ct_dicom_seg_total_fast.nii.gz"))
    aligned = sitk.GetArrayFromImage(align_labels(sitk.Cast(labels, sitk.sitkInt32), image, "labels"))
    mask = np.zeros(aligned.shape, np.uint8)
    mask[aligned == 87], mask[aligned == 86] = 1, 2
    mask[:3] = 0
    out = sitk.GetImageFromArray(mask)
    out.CopyInformation(image)
    return out


def test_the_seg_round_trips_voxel_for_voxel_and_references_the_series(series_mask, tmp_path):
    out = tmp_path / "ct.seg.dcm"
    notes = write_dicom_seg(series_mask, SERIES, CLASSES_2, out, "test")
    assert any("SeriesInstanceUID" in note for note in notes)  # this anonymised series lacks its UIDs
    mask = sitk.GetArrayFromImage(series_mask)
    np.testing.assert_array_equal(read_dicom_seg(out, SERIES), mask)

    seg = pydicom.dcmread(out)
    files = dicom_series_files(SERIES)
    sources = {source_uid(f): pydicom.dcmread(f, stop_before_pixels=True) for f in files}
    non_empty = {(z, n) for z in range(mask.shape[0]) for n in (1, 2) if (mask[z] == n).any()}
    assert int(seg.NumberOfFrames) == len(non_empty)  # empty frames (and the emptied slices) omitted
    referenced = {
        i.ReferencedSOPInstanceUID for s in seg.ReferencedSeriesSequence for i in s.ReferencedInstanceSequence
    }
    assert referenced <= set(sources)
    for group in seg.PerFrameFunctionalGroupsSequence:
        uid = group.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        position = [float(v) for v in group.PlanePositionSequence[0].ImagePositionPatient]
        np.testing.assert_allclose(position, [float(v) for v in sources[uid].ImagePositionPatient], atol=1e-3)
    assert [s.SegmentLabel for s in seg.SegmentSequence] == list(CLASSES_2)
    right = seg.SegmentSequence[0]
    assert right.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "91723000"  # Anatomical Structure
    assert right.SegmentedPropertyTypeCodeSequence[0].CodeValue == "244849004"  # Deep muscle of back
    assert (
        right.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence[0].CodeValue
        == "24028007"
    )
    assert (
        seg.SegmentSequence[1]
        .SegmentedPropertyTypeCodeSequence[0]
        .SegmentedPropertyTypeModifierCodeSequence[0]
        .CodeValue
        == "7771000"
    )
    assert np.allclose(
        [float(v) for v in seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing],
        series_mask.GetSpacing()[:2],
    )


def test_four_class_segments_carry_the_muscle_codes_and_sides():
    descriptions = segment_descriptions(CLASSES_4, "test")
    codes = [
        (
            d.SegmentedPropertyTypeCodeSequence[0].CodeValue,
            d.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence[0].CodeValue,
        )
        for d in descriptions
    ]
    es, mf = MUSCLE_CODES["es"][1], MUSCLE_CODES["mf"][1]
    right, left = LATERALITY_CODES["right"][1], LATERALITY_CODES["left"][1]
    assert codes == [(es, right), (mf, right), (mf, left), (es, left)]
    assert (es, mf) == ("44947003", "5709001") and (right, left) == ("24028007", "7771000")
    # every code is SNOMED CT, whose identifiers end in a Verhoeff check digit
    for scheme, value, _ in (*MUSCLE_CODES.values(), *LATERALITY_CODES.values()):
        assert scheme == "SCT" and _verhoeff_valid(value), value


# Verhoeff's dihedral-group multiplication and position permutation tables
_VERHOEFF_D = [
    [0, 1, 2, 3, 4, 5, 6, 7, 8, 9],
    [1, 2, 3, 4, 0, 6, 7, 8, 9, 5],
    [2, 3, 4, 0, 1, 7, 8, 9, 5, 6],
    [3, 4, 0, 1, 2, 8, 9, 5, 6, 7],
    [4, 0, 1, 2, 3, 9, 5, 6, 7, 8],
    [5, 9, 8, 7, 6, 0, 4, 3, 2, 1],
    [6, 5, 9, 8, 7, 1, 0, 4, 3, 2],
    [7, 6, 5, 9, 8, 2, 1, 0, 4, 3],
    [8, 7, 6, 5, 9, 3, 2, 1, 0, 4],
    [9, 8, 7, 6, 5, 4, 3, 2, 1, 0],
]
_VERHOEFF_P = [[0, 1, 2, 3, 4, 5, 6, 7, 8, 9]]
for _ in range(7):
    _VERHOEFF_P.append([_VERHOEFF_P[-1][[1, 5, 7, 6, 2, 8, 3, 0, 9, 4][k]] for k in range(10)])


def _verhoeff_valid(number: str) -> bool:
    check = 0
    for position, digit in enumerate(reversed(number)):
        check = _VERHOEFF_D[check][_VERHOEFF_P[position % 8][int(digit)]]
    return check == 0


def test_the_verhoeff_check_catches_a_wrong_digit():
    assert _verhoeff_valid("5709001") and not _verhoeff_valid("5709002") and not _verhoeff_valid("5790001")


def _ct_dataset(tmp_path: Path) -> tuple:
    """The real CT dataset (the DICOM series and a NIfTI CT): its description and an empty storage layout."""
    ct_dataset(tmp_path / "data")
    return load_dataset(tmp_path / "data", "ts-ct"), DatasetLayout(tmp_path / "storage", "ts-ct")


def test_final_masks_write_a_seg_for_the_dicom_scan_only(series_mask, tmp_path):
    spec, layout = _ct_dataset(tmp_path)
    # the DICOM scan: any mask on its canonical grid stands in for the stage-3 result
    canonical = sitk.DICOMOrient(series_mask, "LPS")
    write_on_original_grid(spec, layout, "ctdicom", canonical, "test")
    assert layout.final_mask_dicom_seg("ctdicom").exists()
    np.testing.assert_array_equal(
        read_dicom_seg(layout.final_mask_dicom_seg("ctdicom"), SERIES), sitk.GetArrayFromImage(series_mask)
    )
    # the NIfTI scan: a NIfTI final mask and no SEG
    nifti = read_image(spec.scans["ctsm"].image)
    blank = sitk.GetImageFromArray(np.ones(sitk.GetArrayViewFromImage(nifti).shape, np.uint8))
    blank.CopyInformation(nifti)
    # as if "ctsm" had been a DICOM series on an earlier run: its SEG goes with the series
    layout.final_mask_dicom_seg("ctsm").write_bytes(layout.final_mask_dicom_seg("ctdicom").read_bytes())
    assert write_on_original_grid(spec, layout, "ctsm", sitk.DICOMOrient(blank, "LPS"), "test") == []
    assert layout.final_mask("ctsm").exists() and not layout.final_mask_dicom_seg("ctsm").exists()
    assert not list(Path(layout.dir("final_masks")).glob("ctsm*.dcm"))


def test_an_empty_final_mask_of_a_dicom_scan_has_no_seg_and_counts_as_current(series_mask, tmp_path):
    from nnsam2_assets.core.storage import atomic_write_image
    from nnsam2_assets.refinement.final_masks import _dicom_seg_current

    spec, layout = _ct_dataset(tmp_path)
    canonical = sitk.DICOMOrient(series_mask, "LPS")
    write_on_original_grid(spec, layout, "ctdicom", canonical, "test")
    atomic_write_image(canonical, layout.final_mask_canonical("ctdicom"))
    assert _dicom_seg_current(spec, layout, "ctdicom")
    layout.final_mask_dicom_seg("ctdicom").unlink()
    assert not _dicom_seg_current(spec, layout, "ctdicom")  # a lost SEG of a mask with content: recompute
    empty = sitk.Image(canonical.GetSize(), sitk.sitkUInt8)
    empty.CopyInformation(canonical)
    notes = write_on_original_grid(spec, layout, "ctdicom", empty, "test")
    atomic_write_image(empty, layout.final_mask_canonical("ctdicom"))
    assert notes == ["the final mask is empty: no DICOM Segmentation written"]
    assert _dicom_seg_current(spec, layout, "ctdicom")  # nothing to write: not recomputed on every run
    assert layout.final_mask_dicom_seg_refusal("ctdicom").read_text().strip() == notes[0]
    assert _dicom_seg_current(spec, layout, "ctsm")  # a NIfTI scan never has one


def test_a_uid_some_instances_lack_is_taken_from_the_others():
    """One blank StudyInstanceUID had replaced the series' real one by a derived UID in every instance, so
    the SEG named a study (or frame of reference) that does not exist."""
    from nnsam2_assets.outputs.dicom_seg import _repaired

    sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in dicom_series_files(SERIES)]
    for source in sources:
        source.StudyInstanceUID = "1.2.3.4"
        source.FrameOfReferenceUID = "1.2.3.5"
    sources[0].StudyInstanceUID = sources[0].FrameOfReferenceUID = ""
    repaired, notes = _repaired(SERIES, sources, 2.5)
    assert {str(s.StudyInstanceUID) for s in repaired} == {"1.2.3.4"}
    assert {str(s.FrameOfReferenceUID) for s in repaired} == {"1.2.3.5"}
    assert (
        f"1 of {len(sources)} instances have no StudyInstanceUID; the SEG uses the others' 1.2.3.4" in notes
    )
    sources[0].FrameOfReferenceUID, sources[1].FrameOfReferenceUID = "", "1.2.3.6"
    with pytest.raises(ScanError, match=r"its instances name 2 different FrameOfReferenceUIDs"):
        _repaired(SERIES, sources, 2.5)


def test_a_series_whose_anonymiser_deleted_patient_and_study_attributes_still_gets_its_seg(
    series_mask, tmp_path
):
    """highdicom copies PatientName, StudyDate, SliceThickness ... from the sources: a series without them
    (deleted, not blanked) failed with a bare AttributeError that named neither the series nor the field."""
    deleted = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime")
    deleted += ("AccessionNumber", "StudyID", "ReferringPhysicianName", "SliceThickness")
    series = tmp_path / "series"
    series.mkdir()
    for f in dicom_series_files(SERIES):
        ds = pydicom.dcmread(f)
        for attr in deleted:
            if attr in ds:
                delattr(ds, attr)
        ds.save_as(series / Path(f).name)
    out = tmp_path / "ct.seg.dcm"
    notes = write_dicom_seg(series_mask, series, CLASSES_2, out, "test")
    np.testing.assert_array_equal(read_dicom_seg(out, series), sitk.GetArrayFromImage(series_mask))
    seg = pydicom.dcmread(out)
    assert str(seg.PatientName) == "" and seg.StudyDate == ""
    thickness = seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].SliceThickness
    assert float(thickness) == pytest.approx(series_mask.GetSpacing()[2], abs=1e-4)
    assert any("lacks AccessionNumber" in note and "the SEG has them empty" in note for note in notes)
    assert any("no SliceThickness; the SEG gives the slice spacing" in note for note in notes)


def test_a_series_no_seg_can_be_made_of_keeps_its_nifti_mask_and_fails_no_other_scan(series_mask, tmp_path):
    """Instances naming two frames of reference: no SEG can say which one it overlays. That error once
    escaped the scan and failed the final masks of every scan of the dataset."""
    spec, layout = _ct_dataset(tmp_path)
    canonical = sitk.DICOMOrient(series_mask, "LPS")
    write_on_original_grid(spec, layout, "ctdicom", canonical, "test")  # an earlier SEG, now stale
    folder = spec.scans["ctdicom"].image
    assert folder.is_symlink()  # to the shared series, which is never written
    folder.unlink()
    folder.mkdir()
    for n, f in enumerate(dicom_series_files(SERIES)):
        ds = pydicom.dcmread(f)
        ds.FrameOfReferenceUID = "" if n == 0 else f"1.2.3.{n % 2}"
        ds.save_as(folder / Path(f).name)
    notes = write_on_original_grid(spec, layout, "ctdicom", canonical, "test")
    assert layout.final_mask("ctdicom").exists() and not layout.final_mask_dicom_seg("ctdicom").exists()
    (note,) = notes
    assert note.startswith(f"no DICOM Segmentation written: {folder}: its instances name 2 different")
    # the reason stands in for the SEG: the scan is not recomputed on every run, and the user can read why
    from nnsam2_assets.refinement.final_masks import _dicom_seg_current

    assert layout.final_mask_dicom_seg_refusal("ctdicom").read_text().strip() == note
    assert _dicom_seg_current(spec, layout, "ctdicom")
    # the series mended: its SEG is written and the reason goes
    for f in dicom_series_files(folder):
        ds = pydicom.dcmread(f)
        ds.FrameOfReferenceUID = "1.2.3.0"
        ds.save_as(f)
    write_on_original_grid(spec, layout, "ctdicom", canonical, "test")
    assert layout.final_mask_dicom_seg("ctdicom").exists()
    assert not layout.final_mask_dicom_seg_refusal("ctdicom").exists()


def _multiframe(series_dir: Path, order: list[int] | None = None) -> Path:
    """The real series as one enhanced (multi-frame) CT file, highdicom's legacy conversion; ``order``
    restacks its frames (pixels and per-frame positions together)."""
    import highdicom as hd
    from pydicom.sequence import Sequence

    sources = [pydicom.dcmread(f) for f in dicom_series_files(SERIES)]
    for source in sources:  # this anonymised series keeps its UIDs only in the meta headers, or nowhere
        source.SOPClassUID = source.file_meta.MediaStorageSOPClassUID
        source.SOPInstanceUID = source.file_meta.MediaStorageSOPInstanceUID
        for attr, uid in (("StudyInstanceUID", "1.2.3.1"), ("SeriesInstanceUID", "1.2.3.2")):
            setattr(source, attr, str(source.get(attr, "")).strip() or uid)
        source.FrameOfReferenceUID = str(source.get("FrameOfReferenceUID", "")).strip() or "1.2.3.3"
    enhanced = hd.legacy.LegacyConvertedEnhancedCTImage(
        sources, series_instance_uid=hd.UID(), series_number=2, sop_instance_uid=hd.UID(), instance_number=1
    )
    if order is not None:
        pixels = enhanced.pixel_array[order]
        groups = list(enhanced.PerFrameFunctionalGroupsSequence)
        enhanced.PerFrameFunctionalGroupsSequence = Sequence([groups[i] for i in order])
        enhanced.NumberOfFrames = len(order)
        enhanced.PixelData = pixels.astype(enhanced.pixel_array.dtype).tobytes()
        enhanced.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian  # the pixels as written
    series_dir.mkdir()
    enhanced.save_as(series_dir / "enhanced.dcm")
    return series_dir


def test_a_multi_frame_series_is_read_on_its_frames_positions_and_gets_its_seg(series_mask, tmp_path):
    """A series kept in one enhanced multi-frame file: read as the same scan as its one-file-per-slice
    original, its frames' positions held against the grid (they were never checked: two frames per position
    or frames out of order were stacked on an even grid, slices mm from where they were acquired), and its
    SEG written and read back frame by frame (the writer compared the mask with a 4-D reading and refused)."""
    original = read_image(SERIES)
    enhanced_dir = _multiframe(tmp_path / "enhanced")
    enhanced = read_image(enhanced_dir)  # its frames are stored head to feet: the same voxels, z reversed
    same = sitk.DICOMOrient(enhanced, "LPS")
    assert same.GetSize() == original.GetSize()
    np.testing.assert_allclose(same.GetOrigin(), original.GetOrigin(), atol=1e-3)
    np.testing.assert_allclose(same.GetSpacing(), original.GetSpacing(), atol=1e-4)
    np.testing.assert_allclose(same.GetDirection(), original.GetDirection(), atol=1e-6)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(same), sitk.GetArrayFromImage(original))

    mask = sitk.Resample(series_mask, enhanced, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    out = tmp_path / "enhanced.seg.dcm"
    write_dicom_seg(mask, enhanced_dir, CLASSES_2, out, "test")
    np.testing.assert_array_equal(read_dicom_seg(out, enhanced_dir), sitk.GetArrayFromImage(mask))
    assert (sitk.GetArrayFromImage(mask) == sitk.GetArrayFromImage(series_mask)[::-1]).all()

    n = original.GetSize()[2]
    swapped = [0, 2, 1, *range(3, n)]
    with pytest.raises(
        ScanError, match=r"swapped: slice [0-9]+ \(enhanced\.dcm frame [0-9]+\) lies [0-9.]+ mm from where"
    ):
        read_image(_multiframe(tmp_path / "swapped", swapped))
    doubled = [k // 2 for k in range(n)]  # two frames per position, as two echoes are stored
    with pytest.raises(
        ScanError, match=r"multi-frame file holding frames out of order or several per position"
    ):
        read_image(_multiframe(tmp_path / "doubled", doubled))


def test_a_multi_frame_file_with_an_empty_shared_group_is_read_on_its_frames_own_attributes(tmp_path):
    """The shared functional group is type 2: a file may leave it empty and give every frame its own plane,
    pixel measures and rescale. Taking its first item raised IndexError, which escaped the scan and failed the
    dataset's whole ingest."""
    from pydicom.sequence import Sequence

    folder = _multiframe(tmp_path / "per_frame")
    path = folder / "enhanced.dcm"
    as_shared = read_image(folder)
    ds = pydicom.dcmread(path)
    shared = ds.SharedFunctionalGroupsSequence[0]
    for group in ds.PerFrameFunctionalGroupsSequence:
        for element in shared:
            group[element.tag] = element
    ds.SharedFunctionalGroupsSequence = Sequence([])
    ds.save_as(path)
    per_frame = read_image(folder)
    assert per_frame.GetSize() == as_shared.GetSize()
    np.testing.assert_allclose(per_frame.GetOrigin(), as_shared.GetOrigin(), atol=1e-3)
    np.testing.assert_allclose(per_frame.GetSpacing(), as_shared.GetSpacing(), atol=1e-4)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(per_frame), sitk.GetArrayFromImage(as_shared))

    # a top-level position too, as some converters write: the reader's one dictionary is the file's, not a
    # frame's (asking it for frame 2's had failed the read as a corrupt file)
    ds.ImagePositionPatient = (
        ds.PerFrameFunctionalGroupsSequence[0].PlanePositionSequence[0].ImagePositionPatient
    )
    ds.save_as(path)
    np.testing.assert_array_equal(
        sitk.GetArrayFromImage(read_image(folder)), sitk.GetArrayFromImage(as_shared)
    )

    ds.PerFrameFunctionalGroupsSequence[1].PlanePositionSequence[0].ImagePositionPatient = 7  # one number
    ds.save_as(path)
    with pytest.raises(
        ScanError, match=r"enhanced\.dcm: Image Position \(Patient\) holds '7.0', not three numbers"
    ):
        read_image(folder)


def test_writing_a_series_scans_final_mask_reads_the_series_image_once(series_mask, tmp_path, monkeypatch):
    """The original grid and the SEG's grid check share one reading of the series (a CT series is hundreds of
    files; it had been read twice, besides pydicom's reading that highdicom needs)."""
    from nnsam2_assets.outputs import dicom_seg
    from nnsam2_assets.refinement import final_masks

    spec, layout = _ct_dataset(tmp_path)
    reads = []

    def counted(path, *args, **kwargs):
        reads.append(Path(path))
        return read_image(path, *args, **kwargs)

    monkeypatch.setattr(final_masks, "read_image", counted)
    monkeypatch.setattr(dicom_seg, "read_image", counted)
    write_on_original_grid(spec, layout, "ctdicom", sitk.DICOMOrient(series_mask, "LPS"), "test")
    assert layout.final_mask_dicom_seg("ctdicom").exists()
    assert reads == [spec.scans["ctdicom"].image]


def test_a_series_file_without_its_preamble_still_gets_its_seg(series_mask, tmp_path):
    """A file without the 128-byte preamble and "DICM": GDCM reads it (ingest accepted the series), pydicom
    only when forced. Its InvalidDicomError escaped the scan and failed the final masks of every scan."""
    spec, layout = _ct_dataset(tmp_path)
    canonical = sitk.DICOMOrient(series_mask, "LPS")
    folder = spec.scans["ctdicom"].image
    folder.unlink()
    folder.mkdir()
    files = dicom_series_files(SERIES)
    for f in files:
        (folder / Path(f).name).write_bytes(Path(f).read_bytes())
    raw = (folder / Path(files[2]).name).read_bytes()
    (folder / Path(files[2]).name).write_bytes(raw[132:])  # preamble and "DICM" gone
    with pytest.raises(pydicom.errors.InvalidDicomError):
        pydicom.dcmread(folder / Path(files[2]).name)
    notes = write_on_original_grid(spec, layout, "ctdicom", canonical, "test")
    assert not any(note.startswith("no DICOM Segmentation written") for note in notes), notes
    assert layout.final_mask("ctdicom").exists() and layout.final_mask_dicom_seg("ctdicom").exists()


def test_an_enhanced_file_at_one_millimetre_is_read_and_a_classic_series_without_positions_is_not(tmp_path):
    """An enhanced file keeps its Pixel Spacing in functional groups: at a true 1 x 1 mm it had been refused as
    spacing the reader made up. A classic series with no position on any slice (and one slice missing) had
    been taken as an enhanced one and read at a made-up 1 mm slice spacing."""
    folder = _multiframe(tmp_path / "enhanced")
    ds = pydicom.dcmread(folder / "enhanced.dcm")
    for group in (ds.SharedFunctionalGroupsSequence[0], *ds.PerFrameFunctionalGroupsSequence):
        if "PixelMeasuresSequence" in group:
            group.PixelMeasuresSequence[0].PixelSpacing = [1.0, 1.0]
    ds.save_as(folder / "enhanced.dcm")
    assert read_image(folder).GetSpacing()[:2] == (1.0, 1.0)

    classic = tmp_path / "classic"
    classic.mkdir()
    for k, f in enumerate(dicom_series_files(SERIES)):
        if k == 7:
            continue  # a missing slice
        ds = pydicom.dcmread(f)
        del ds.ImagePositionPatient
        ds.save_as(classic / Path(f).name)
    with pytest.raises(ScanError, match=rf"^{classic}/[^:]+: no Image Position \(Patient\)"):
        read_image(classic)
