"""Final masks as DICOM Segmentation objects (highdicom), for scans ingested from a DICOM series.

One segment per class (segment number = class id), category Anatomical Structure, type and laterality from
``core.labels.segment_codes``; frames reference their source instances, and frames without a voxel of
their segment are omitted. Viewers (3D Slicer, OHIF, PACS) overlay the object on the original series.
"""

from __future__ import annotations

import io
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import SimpleITK as sitk

from nnsam2_assets.core.imaging import ScanError, dicom_series_files, read_image, same_grid
from nnsam2_assets.core.labels import ANATOMICAL_STRUCTURE, segment_codes
from nnsam2_assets.core.storage import atomic_write_bytes

SOFTWARE = "nnsam2_assets"


def _code(code: tuple[str, str, str]) -> hd.sr.CodedConcept:
    scheme, value, meaning = code
    return hd.sr.CodedConcept(value=value, scheme_designator=scheme, meaning=meaning)


def segment_descriptions(class_names: tuple[str, ...], version: str) -> list[hd.seg.SegmentDescription]:
    algorithm = hd.AlgorithmIdentificationSequence(
        name="nnsam2", version=version, family=pydicom.sr.codedict.codes.cid7162.ArtificialIntelligence
    )
    out = []
    for number, name in enumerate(class_names, start=1):
        muscle, side = segment_codes(name)
        description = hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=name,
            segmented_property_category=_code(ANATOMICAL_STRUCTURE),
            segmented_property_type=_code(muscle),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
        )
        description.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [
            _code(side)
        ]
        out.append(description)
    return out


def _repaired(
    series: Path, sources: list[pydicom.Dataset], slice_spacing: float
) -> tuple[list[pydicom.Dataset], list[str]]:
    """Fill what anonymisers blank and a SEG must copy, in the in-memory copies only (never the user's
    files): the SOP class and instance UIDs from each file's meta header (the same facts); a study, series
    or frame-of-reference UID that some instances lack from the others (a viewer overlays a SEG only on
    the frame of reference it names), and one that all lack derived from the instances' UIDs, so it is the
    same on every run. Patient and study attributes the SEG copies (type 2) that an anonymiser deleted are
    present and empty, and a missing SliceThickness is the slices' spacing. Returns the notes to show: a SEG
    of a series without its own UIDs cannot be paired with it by a viewer automatically."""
    notes = []
    for source in sources:
        for attr, meta in (
            ("SOPClassUID", "MediaStorageSOPClassUID"),
            ("SOPInstanceUID", "MediaStorageSOPInstanceUID"),
        ):
            if not str(source.get(attr, "")).strip():
                setattr(source, attr, source.file_meta.get(meta, ""))
    instances = sorted(str(s.SOPInstanceUID) for s in sources)
    for attr in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
        blank = [s for s in sources if not str(s.get(attr, "")).strip()]
        if not blank:
            continue
        given = sorted({str(s.get(attr)).strip() for s in sources} - {"", "None"})
        if len(given) > 1:
            raise ScanError(
                series, f"its instances name {len(given)} different {attr}s ({', '.join(given[:3])})"
            )
        if given:  # the instances that name it say what the blank ones belong to
            value = given[0]
            notes.append(
                f"{len(blank)} of {len(sources)} instances have no {attr}; the SEG uses the others' {value}"
            )
        else:
            value = pydicom.uid.generate_uid(entropy_srcs=[attr, *instances])
            notes.append(f"the series has no {attr}; the SEG uses {value}, derived from its instances")
        for source in blank:
            setattr(source, attr, value)
    absent = sorted({attr for s in sources for attr in COPIED_TYPE_2 if attr not in s})
    for source in sources:
        for attr in absent:
            if attr not in source:
                setattr(source, attr, "")  # type 2: present and empty is what the standard allows
    if absent:
        notes.append(f"the series lacks {', '.join(absent)}; the SEG has them empty")
    thin = [s for s in sources if not str(s.get("SliceThickness", "") or "").strip()]
    if thin:  # the SEG's pixel measures need one; the slices' spacing is the nearest fact we have
        for source in thin:
            source.SliceThickness = f"{slice_spacing:.6g}"
        notes.append(
            f"the series has no SliceThickness; the SEG gives the slice spacing, {slice_spacing:.6g} mm"
        )
    return sources, notes


# type 2 attributes highdicom copies from the source instances into the SEG; anonymisers that delete them
# rather than blank them left it failing with a bare AttributeError
COPIED_TYPE_2 = (
    "AccessionNumber",
    "PatientBirthDate",
    "PatientID",
    "PatientName",
    "PatientSex",
    "ReferringPhysicianName",
    "StudyDate",
    "StudyID",
    "StudyTime",
)


def _read_source(path: str) -> pydicom.Dataset:
    """One file of the series. GDCM, which ingest reads with, takes a file without the preamble and "DICM"
    marker; pydicom does when forced, and a file it cannot read even so refuses the SEG alone."""
    try:
        return pydicom.dcmread(path)
    except pydicom.errors.InvalidDicomError:
        pass
    except (OSError, ValueError) as exc:
        raise ScanError(path, f"pydicom cannot read this file of the series ({exc})") from exc
    try:
        return pydicom.dcmread(path, force=True)
    except Exception as exc:  # noqa: BLE001 - a forced read raises whatever the bytes provoke
        raise ScanError(path, f"pydicom cannot read this file of the series ({exc})") from exc


def write_dicom_seg(
    mask: sitk.Image, series: Path, class_names: tuple[str, ...], out: Path, version: str,
    stacked: sitk.Image | None = None,
) -> list[str]:  # fmt: skip
    """Write ``mask`` (class ids on the series' own grid, as ``read_image`` stacks it) as a DICOM SEG;
    returns notes on identifiers the series lacked (see ``_repaired``). ``stacked``: the series as
    ``read_image`` stacked it, where the caller holds it already (it is read otherwise)."""
    files = dicom_series_files(series)
    if stacked is None:  # as ingest read it: one multi-frame file is [x, y, frame], not 4-D
        stacked = read_image(series)
    if not same_grid(mask, stacked):
        raise ScanError(out, "the mask is not on the DICOM series' grid")
    sources, notes = _repaired(series, [_read_source(f) for f in files], stacked.GetSpacing()[2])
    labels = sitk.GetArrayFromImage(mask).astype(np.uint8)  # [slice, row, column], slices in file order
    present = [n for n in range(1, len(class_names) + 1) if (labels == n).any()]
    if not present:
        raise ScanError(out, "the mask is empty: a DICOM Segmentation needs at least one segment")
    try:
        seg = _segmentation(sources, labels, class_names, version)
    except (AttributeError, TypeError, ValueError) as exc:  # what highdicom raises on a source it cannot use
        raise ScanError(series, f"cannot make a DICOM Segmentation of this series: {exc}") from exc
    buffer = io.BytesIO()
    seg.save_as(buffer)
    atomic_write_bytes(buffer.getvalue(), out)
    return notes


def _segmentation(
    sources: list[pydicom.Dataset], labels: np.ndarray, class_names: tuple[str, ...], version: str
) -> hd.seg.Segmentation:
    return hd.seg.Segmentation(
        source_images=sources,
        pixel_array=labels,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segment_descriptions(class_names, version),
        series_instance_uid=hd.UID(),
        series_number=9100,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=SOFTWARE,
        manufacturer_model_name="nnsam2 final masks",
        software_versions=version,
        device_serial_number="0",
        series_description="nnsam2 lumbar paraspinal muscles",
        omit_empty_frames=True,
    )


def source_uid(path: str) -> str:
    """A source file's SOP instance UID (its meta header's when the dataset's own is blank)."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return str(ds.get("SOPInstanceUID", "")).strip() or str(ds.file_meta.MediaStorageSOPInstanceUID)


def read_dicom_seg(path: Path, series: Path) -> np.ndarray:
    """The object back as class ids on the series' grid [slice, row, column], frame by frame through each
    frame's referenced source instance and segment number (for checks and round trips)."""
    seg = pydicom.dcmread(str(path))
    files = dicom_series_files(series)
    index = {source_uid(f): z for z, f in enumerate(files)}
    frames = seg.pixel_array.reshape(int(seg.NumberOfFrames), int(seg.Rows), int(seg.Columns))
    labels = np.zeros((read_image(series).GetSize()[2], int(seg.Rows), int(seg.Columns)), np.uint8)
    for frame, group in zip(frames, seg.PerFrameFunctionalGroupsSequence, strict=True):
        source = group.DerivationImageSequence[0].SourceImageSequence[0]
        # a source that is one multi-frame file is referenced frame by frame
        z = index[source.ReferencedSOPInstanceUID] + int(source.get("ReferencedFrameNumber", 1)) - 1
        number = int(group.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        labels[z][frame > 0] = number
    return labels
