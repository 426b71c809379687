"""Hostile files: a NIfTI header claiming more voxels than any scan (a few hundred bytes can claim
terabytes), a complete gzip stream holding less data than its header needs, a scan whose preparation fails
inside SimpleITK (its error stays its own), a Dixon id that would share a stored file with another scan, and
a dataset.yaml, region table or Slicer header built to exhaust memory or time."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from nnsam2_assets.core.imaging import MAX_VOXELS, ScanError, read_source_image
from nnsam2_assets.core.layout import DatasetLayout
from nnsam2_assets.ingest import scans as ingest
from nnsam2_assets.ingest.convention import MAX_YAML_BYTES, load_dataset
from nnsam2_assets.ingest.errors import DatasetError
from nnsam2_assets.ingest.regions import MAX_TABLE_BYTES, read_regions
from nnsam2_assets.ingest.slicer import MAX_SEGMENTS, read_slicer_labels
from nnsam2_assets.testing.cohorts import write_tiny_dataset


def _nifti_claiming(path: Path, shape: tuple[int, ...], payload: bytes) -> Path:
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.int16)
    header["vox_offset"] = 352
    path.write_bytes(gzip.compress(header.binaryblock + b"\0" * 4 + payload))
    return path


def test_a_header_claiming_more_voxels_than_any_scan_is_refused_before_reading(tmp_path):
    path = _nifti_claiming(tmp_path / "huge.nii.gz", (4096, 4096, 4096), b"\0" * 64)
    with pytest.raises(ScanError, match=rf"{path}: its header claims 4096x4096x4096 voxels, more than"):
        read_source_image(path)
    assert MAX_VOXELS < 4096**3


def test_a_complete_stream_with_too_little_data_is_refused(tmp_path):
    """The reader pads the missing voxels with zeros: an empty mask and a wrong volume, without a word."""
    path = _nifti_claiming(tmp_path / "short.nii.gz", (8, 8, 8), b"\1\0" * 100)
    with pytest.raises(ScanError, match=rf"{path}: holds 552 bytes where its header needs 1,376"):
        read_source_image(path)
    whole = _nifti_claiming(tmp_path / "whole.nii.gz", (8, 8, 8), b"\1\0" * 512)
    assert read_source_image(whole).GetSize() == (8, 8, 8)


def test_a_scan_failing_inside_simpleitk_is_excluded_alone(tmp_path, monkeypatch):
    """A RuntimeError (or MemoryError) deep in one scan's preparation had failed the dataset's whole ingest,
    and no manifest was written for the good scans."""
    write_tiny_dataset(tmp_path / "data", "ds", 3, seed=1)
    spec = load_dataset(tmp_path / "data", "ds")
    prepare = ingest.prepare_scan

    def failing_for_subj02(spec, source, reference):
        if source.image.name.startswith("subj02"):
            raise RuntimeError("Exception thrown in SimpleITK DICOMOrient: std::bad_alloc")
        return prepare(spec, source, reference)

    monkeypatch.setattr(ingest, "prepare_scan", failing_for_subj02)
    report = ingest.ingest_scans(spec, DatasetLayout(tmp_path / "storage", "ds"))
    manifest = report.manifest.set_index("scan")
    assert list(manifest.status) == ["ok", "ok", "error"]
    assert manifest.loc["subj02", "error"].endswith(
        "could not be prepared (RuntimeError: Exception thrown in SimpleITK DICOMOrient: std::bad_alloc)"
    )


def test_a_scan_file_the_process_may_not_read_is_excluded_alone_and_a_storage_read_error_fails(
    tmp_path, monkeypatch
):
    """A file another user owns on a shared data root raised PermissionError while its content was hashed:
    it escaped the scan and failed the dataset's whole ingest, with no manifest for the good scans. An
    error reading the storage root is not a scan's: it fails the step, and no scan's outputs are removed."""
    write_tiny_dataset(tmp_path / "data", "ds", 3, seed=1)
    spec = load_dataset(tmp_path / "data", "ds")
    layout = DatasetLayout(tmp_path / "storage", "ds")
    hashed = ingest.sha256_path

    def unreadable_subj02(path):
        if Path(path).name.startswith("subj02"):
            raise PermissionError(13, "Permission denied", str(path))
        return hashed(path)

    monkeypatch.setattr(ingest, "sha256_path", unreadable_subj02)
    manifest = ingest.ingest_scans(spec, layout).manifest.set_index("scan")
    assert list(manifest.status) == ["ok", "ok", "error"]
    image = spec.scans["subj02"].image
    assert manifest.loc["subj02", "error"] == (
        f"{image}: could not be prepared (PermissionError: [Errno 13] Permission denied: '{image}')"
    )

    monkeypatch.setattr(ingest, "sha256_path", hashed)
    ingest.ingest_scans(spec, layout)
    stored = layout.scan_image("subj00")
    cache_info = ingest.ScanCache.info

    def unreadable_cache(self, scan_id):
        raise PermissionError(13, "Permission denied", str(self.folder / f"{scan_id}.json"))

    monkeypatch.setattr(ingest.ScanCache, "info", unreadable_cache)
    with pytest.raises(PermissionError):
        ingest.ingest_scans(spec, layout)
    monkeypatch.setattr(ingest.ScanCache, "info", cache_info)
    assert stored.exists() and layout.manifest.exists()


def _series_with_a_two_value_position(folder: Path) -> Path:
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    for k in range(4):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.Modality, ds.PatientID, ds.InstanceNumber = "CT", "p", k + 1
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [0, 0, 2.0 * k] if k != 2 else [0, 0]  # one file's position is two numbers
        ds.PixelSpacing, ds.SliceThickness, ds.Rows, ds.Columns = [1, 1], 2, 8, 8
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.PixelData = np.full((8, 8), k, np.int16).tobytes()
        pydicom.dcmwrite(folder / f"{k}.dcm", ds, enforce_file_format=True)
    return folder


def test_a_dicom_series_with_a_malformed_position_is_excluded_alone(tmp_path):
    """numpy's ValueError on a two-number Image Position (Patient) escaped the scan and failed the whole
    dataset's ingest: no manifest, every good scan lost."""
    folder = write_tiny_dataset(tmp_path / "data", "ds", 2, seed=1, kind="ct")
    _series_with_a_two_value_position(folder / "scans" / "zz")
    report = ingest.ingest_scans(
        load_dataset(tmp_path / "data", "ds"), DatasetLayout(tmp_path / "storage", "ds")
    )
    manifest = report.manifest.set_index("scan")
    assert list(manifest.status) == ["ok", "ok", "error"]
    assert (
        manifest.loc["zz", "error"]
        == f"{folder / 'scans' / 'zz' / '2.dcm'}: Image Position (Patient) holds '0.0', '0.0', not three numbers"
    )


def test_a_dixon_scan_id_ending_in_fat_is_refused(tmp_path):
    """Scan ``subj01_fat``'s image and scan ``subj01``'s fat image were one file under the storage root: each
    scan was measured on the other's image."""
    folder = write_tiny_dataset(tmp_path / "data", "ds", 2, seed=1)
    scans = folder / "scans"
    for part in ("water", "fat"):
        (scans / f"subj01_fat_{part}.nii.gz").write_bytes((scans / f"subj00_{part}.nii.gz").read_bytes())
    spec = load_dataset(tmp_path / "data", "ds")
    assert "subj01" in spec.scans and "subj01_fat" not in spec.scans
    why = spec.excluded["subj01_fat"]
    assert why.startswith(str(scans / "subj01_fat_")) and why.endswith(
        ".nii.gz: a Dixon scan id may not end in '_fat' ('subj01_fat'): rename the pair, e.g. subj01-fat"
    )


def test_outside_dixon_a_scan_named_like_a_fat_image_keeps_its_image_when_the_other_scan_fails(tmp_path):
    """Scan ``subj01_fat`` of a CT dataset is stored where a Dixon dataset keeps scan ``subj01``'s fat image:
    re-ingesting or excluding ``subj01`` deleted ``subj01_fat``'s ingested image, which the manifest still
    listed as ok."""
    folder = write_tiny_dataset(tmp_path / "data", "ds", 2, seed=1, kind="ct")
    scans = folder / "scans"
    (scans / "subj01_fat.nii.gz").write_bytes((scans / "subj01.nii.gz").read_bytes())
    regions = folder / "regions.csv"
    if regions.exists():
        row = next(line for line in regions.read_text().splitlines() if line.startswith("subj01,"))
        regions.write_text(
            regions.read_text().rstrip("\n") + "\n" + row.replace("subj01,", "subj01_fat,") + "\n"
        )
    layout = DatasetLayout(tmp_path / "storage", "ds")
    first = ingest.ingest_scans(load_dataset(tmp_path / "data", "ds"), layout).manifest.set_index("scan")
    assert list(first.status) == ["ok", "ok", "ok"]
    for change in ("the scan", "its regions.csv row"):  # re-ingested, then excluded
        if change == "the scan":
            (scans / "subj01.nii.gz").write_bytes((scans / "subj00.nii.gz").read_bytes())
        else:
            regions.write_text(regions.read_text().replace("subj01,12,", "subj01,twelve,"))
        spec = load_dataset(tmp_path / "data", "ds")
        manifest = ingest.ingest_scans(spec, layout).manifest.set_index("scan")
        assert manifest.loc["subj01_fat", "status"] == "ok" and layout.scan_image("subj01_fat").exists()
    assert manifest.loc["subj01", "status"] == "error" and not layout.scan_image("subj01").exists()


def test_a_dataset_yaml_with_aliases_or_too_many_bytes_is_refused(tmp_path):
    """Nested aliases let a 475-byte dataset.yaml expand to 400 MB when read (9x per level), on every
    sensor tick and for every dataset; a description never needs them."""
    folder = write_tiny_dataset(tmp_path / "data", "ds", 2, seed=1)
    cfg = folder / "dataset.yaml"
    original = cfg.read_text()
    levels = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    levels += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 7)]
    cfg.write_text("\n".join(levels) + "\nmodality: *a6\n")
    with pytest.raises(
        DatasetError, match=rf"{cfg}: not valid YAML \(aliases \(\*name\) are not accepted here"
    ):
        load_dataset(tmp_path / "data", "ds")
    cfg.write_text(original + "#" * MAX_YAML_BYTES)
    with pytest.raises(DatasetError, match=rf"{cfg}: [\d,]+ bytes, more than a dataset description needs"):
        load_dataset(tmp_path / "data", "ds")
    cfg.write_text(original)
    assert load_dataset(tmp_path / "data", "ds").name == "ds"


def test_a_dataset_description_nested_too_deeply_or_naming_no_real_value_is_the_datasets_error(tmp_path):
    """20,000 nested brackets (far under the size cap) raised RecursionError, which escaped every caller: no
    dataset was registered or run. A date that does not exist named no file."""
    folder = write_tiny_dataset(tmp_path / "data", "ds", 2, seed=1)
    cfg = folder / "dataset.yaml"
    original = cfg.read_text()
    cfg.write_text(original + "x: " + "[" * 20000 + "]" * 20000 + "\n")
    with pytest.raises(DatasetError, match=rf"{cfg}: nested too deeply"):
        load_dataset(tmp_path / "data", "ds")
    cfg.write_text(original + "acquired: 2024-02-30\n")
    with pytest.raises(DatasetError, match=rf"{cfg}: a value cannot be read"):
        load_dataset(tmp_path / "data", "ds")


def test_a_region_index_of_thousands_of_digits_excludes_its_scan_alone_naming_the_row(tmp_path):
    """It raised a bare ValueError (Python reads at most 4,300 digits) that refused the dataset naming no
    file; from dataset.yaml a 400-digit one overflowed a float in region finding and failed every scan."""
    folder = write_tiny_dataset(tmp_path / "data", "ds", 2, seed=1)
    (folder / "regions.csv").write_text(f"scan,first_slice,last_slice\nsubj01,1,{'9' * 5000}\n")
    spec = load_dataset(tmp_path / "data", "ds")
    assert "subj00" in spec.scans and "subj01" in spec.excluded
    assert spec.excluded["subj01"].startswith(f"{folder / 'regions.csv'} row 2, column last_slice: 99999")


def test_a_region_table_that_is_a_pipe_or_a_broken_link_is_refused_unread(tmp_path):
    """A pipe named regions.csv blocked the sensor's tick for ever: every dataset stalled."""
    import os

    folder = write_tiny_dataset(tmp_path / "data", "ds", 2, seed=1)
    table = folder / "regions.csv"
    table.unlink()
    os.mkfifo(table)
    with pytest.raises(DatasetError, match=rf"{table}: not a regular file"):
        load_dataset(tmp_path / "data", "ds")
    table.unlink()
    table.symlink_to(folder / "gone.csv")
    with pytest.raises(DatasetError, match=rf"{table}: not a regular file"):
        load_dataset(tmp_path / "data", "ds")


def test_a_region_table_too_large_to_be_one_is_refused_unread(tmp_path):
    path = tmp_path / "regions.csv"
    with open(path, "w") as fh:
        fh.write("scan,first_slice,last_slice\n")
        fh.truncate(MAX_TABLE_BYTES + 1)
    with pytest.raises(DatasetError, match=rf"{path}: [\d,]+ bytes, more than a region table needs"):
        read_regions(path)


def test_a_segmentation_listing_thousands_of_segments_is_refused(tmp_path):
    """Each listed segment was a pass over the volume: 200,000 in a header would take the ingest for minutes."""
    labels = sitk.Image(8, 8, 4, sitk.sitkUInt8)
    for i in range(MAX_SEGMENTS + 1):
        labels.SetMetaData(f"Segment{i}_Name", "ES right")
        labels.SetMetaData(f"Segment{i}_LabelValue", "1")
        labels.SetMetaData(f"Segment{i}_Layer", "0")
    path = tmp_path / "many.seg.nrrd"
    sitk.WriteImage(labels, str(path))
    with pytest.raises(ScanError, match=rf"{path}: {MAX_SEGMENTS + 1} segments in the header"):
        read_slicer_labels(path, {}, {"ES right": 1})


def test_a_scan_error_crosses_a_process_boundary_whole():
    """ScanError could not be unpickled (its two arguments came back as one): raised in a propagation worker,
    it broke the pool, and a worker still sending its result blocked for ever, hanging the step."""
    import pickle

    error = pickle.loads(pickle.dumps(ScanError("/data/scan.nii.gz", "holds 12 bytes")))
    assert isinstance(error, ScanError) and (error.path, error.reason) == (
        "/data/scan.nii.gz",
        "holds 12 bytes",
    )
    assert str(error) == "/data/scan.nii.gz: holds 12 bytes"


def test_a_dicom_file_or_segmentation_claiming_gigabytes_is_refused_before_reading(tmp_path):
    """NIfTI headers were held to MAX_VOXELS; an 862-byte DICOM file claiming 24000 x 24000 pixels and a
    small compressed .seg.nrrd claiming 576 million voxels were read, and could take the run's memory."""
    import pydicom

    from nnsam2_assets.core.imaging import dicom_series_files
    from nnsam2_assets.testing.realdata import TS

    series = tmp_path / "series"
    series.mkdir()
    ds = pydicom.dcmread(dicom_series_files(TS / "example_ct_dicom")[0])
    ds.Rows = ds.Columns = 24000
    ds.save_as(series / "slice.dcm")
    with pytest.raises(ScanError, match=r"slice\.dcm: its header claims 24000x24000x1 voxels, more than"):
        read_source_image(series)
    seg = tmp_path / "bomb.seg.nrrd"
    seg.write_bytes(
        b"NRRD0004\ntype: uint8\ndimension: 3\nsizes: 2400 2400 100\nencoding: gzip\n\n"
        + gzip.compress(bytes(1 << 16))
    )
    with pytest.raises(ScanError, match=r"bomb\.seg\.nrrd: its header claims 2400x2400x100 voxels"):
        read_slicer_labels(seg, {1: 1}, {})
    layered = tmp_path / "layers.seg.nrrd"  # 64 layers of 512 x 512 x 100: 1.7 billion values
    layered.write_bytes(
        b"NRRD0004\ntype: uint8\ndimension: 4\nsizes: 64 512 512 100\nkinds: vector domain domain domain\n"
        b"encoding: gzip\n\n" + gzip.compress(bytes(1 << 16))
    )
    with pytest.raises(ScanError, match=r"layers\.seg\.nrrd: its header claims 512x512x100 voxels"):
        read_slicer_labels(layered, {1: 1}, {})
