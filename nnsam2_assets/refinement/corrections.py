"""Corrections: a final mask a user edited (in ITK-SNAP or Slicer) and dropped at
``<dataset>/corrections/<scan>.nii.gz`` (or ``.seg.nrrd``), on the scan's original grid, in our class ids.

A slice is corrected when it differs from the final mask the user started from: the published final mask
when the correction is recorded (its digest is kept beside the correction; a retrain that republishes the
mask before then makes the slices it changed count too), the slices corrected before included, so editing a
corrected mask again keeps the earlier edits. Erasing a slice is a
correction. Recording happens outside any run (the new-data sensor, or ``nnsam2 run``), because the
published mask is downstream of the models that learn from the correction; the record is the
``corrections`` asset. Then:

- ``final_masks`` replaces the corrected slices of that scan's final mask and reports how many and the
  Dice of the uncorrected mask against the correction on them (an honest accuracy signal);
- every nnU-Net stage trains on the corrected slices as exact labels (``refinement.stage_labels``), the next
  time refinement is run; a correction alone never retrains the models.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from nnsam2_assets.core.cache import cache_key
from nnsam2_assets.core.imaging import (
    ScanError,
    read_array,
    read_header,
    read_image,
    read_source_image,
    same_grid,
)
from nnsam2_assets.core.labels import class_names, mean_dice
from nnsam2_assets.core.layout import DatasetLayout
from nnsam2_assets.core.storage import atomic_write_image, atomic_write_json, sha256_file
from nnsam2_assets.ingest.convention import DatasetSpec, check_whole_labels
from nnsam2_assets.ingest.scans import ok_scans, read_manifest
from nnsam2_assets.ingest.slicer import is_slicer_segmentation, read_slicer_labels

# a scan's correction columns (the final masks' table, scan_metrics) when no user corrected it
NO_CORRECTION = {
    "corrected": False,
    "n_corrected_slices": 0,
    "correction_dice": float("nan"),
    "correction_volume_change_ml": 0.0,
}


@dataclass(frozen=True)
class CorrectionRecord:
    scan: str
    source: str
    correction_sha256: str
    base_mask_sha256: str | None  # the published final mask the user started from (None: none yet)
    corrected_slices: list[int]  # canonical crop z
    source_stat: str = ""  # the file's size and mtime when recorded
    # the scan's ingest (manifest source_hash) the slices are numbered on: a new region or new content
    # re-crops the scan, and the record is placed on the new crop before it is used again ("": before v2)
    ingest_key: str = ""
    # each corrected slice's position (the physical point of its first voxel), to place it on a new crop
    slice_points: list[list[float]] = field(default_factory=list)
    # the file was taken away: the record stays, unused, so that a file put back before the final mask
    # without it is published is compared with that mask knowing which of its slices carry these edits
    removed: bool = False

    @property
    def key(self) -> str:
        return f"{self.correction_sha256[:16]}:{','.join(map(str, self.corrected_slices))}"


def read_record(layout: DatasetLayout, scan: str) -> CorrectionRecord | None:
    """The scan's correction record; an unreadable one counts as none (the correction is recorded again)."""
    path = layout.correction_record(scan)
    if not path.exists():
        return None
    try:
        return CorrectionRecord(**json.loads(path.read_text()))
    except (ValueError, TypeError):
        return None


def ingest_keys(layout: DatasetLayout) -> dict[str, str]:
    """{scan: its current ingest's key} of the scans that passed ingest."""
    manifest = read_manifest(layout)
    return {scan: str(manifest.loc[scan, "source_hash"]) for scan in ok_scans(layout, manifest)}


def current_record(
    layout: DatasetLayout, scan: str, keys: dict[str, str] | None = None
) -> CorrectionRecord | None:
    """The scan's record if its slices are numbered on the scan's current crop; None while it waits to be
    placed on a new one (the scan was ingested again since: ``record_corrections`` places it). ``keys``:
    ``ingest_keys(layout)``, when the caller has it."""
    record = read_record(layout, scan)
    keys = ingest_keys(layout) if keys is None else keys
    if record is None or record.removed or record.ingest_key not in ("", keys.get(scan)):
        return None
    if record.ingest_key == "" and not _labels_fit_crop(layout, scan):
        return None  # from before records named their crop, and the crop has changed since: not usable
    return record


def _labels_fit_crop(layout: DatasetLayout, scan: str) -> bool:
    labels, crop = layout.correction_labels(scan), layout.scan_image(scan)
    return labels.exists() and crop.exists() and same_grid(read_header(labels), read_header(crop))


def source_stat(path: Path) -> str:
    st = path.stat()
    return f"{st.st_size}:{st.st_mtime_ns}"


def pending_corrections(spec: DatasetSpec, layout: DatasetLayout) -> list[str]:
    """Scans of an ingested dataset whose correction file is new, changed or gone since it was recorded
    (file size and mtime: cheap enough for every sensor tick)."""
    if not layout.manifest.exists():
        return []
    pending = []
    keys = ingest_keys(layout)
    for scan in sorted(keys):
        if scan in spec.excluded:  # its record waits for it, untouched
            continue
        source = spec.scans[scan].correction if scan in spec.scans else None
        record = read_record(layout, scan)
        if source is None:
            if record is not None and not record.removed:
                pending.append(scan)
            continue
        stat = source_stat(source)
        refused = _refused_marker(layout, scan)
        if refused.exists() and refused.read_text() == stat:
            continue
        if record is None or record.removed or record.source_stat != stat or record.ingest_key != keys[scan]:
            pending.append(scan)
    return pending


def _refused_marker(layout: DatasetLayout, scan: str) -> Path:
    return layout.dir("corrections") / f"{scan}.refused"


def read_correction(spec: DatasetSpec, scan: str, original: sitk.Image, canonical: sitk.Image) -> np.ndarray:
    """The correction file, on the scan's ``original`` grid, brought onto its canonical crop (our class ids);
    clear errors naming the file."""
    path = spec.scans[scan].correction
    spec.confined(path)  # a link out of the data root is refused, as for every file the dataset names
    k = spec.n_classes
    if is_slicer_segmentation(path):
        names = {name: i for i, name in enumerate(class_names(k), start=1)}
        labels = read_slicer_labels(path, {i: i for i in range(1, k + 1)}, names, grid=original)
    else:
        labels = read_source_image(path)
        if not same_grid(labels, original):
            raise ScanError(
                path,
                f"correction is not on the scan's original grid (size {labels.GetSize()}, scan "
                f"{spec.scans[scan].image} size {original.GetSize()}): edit the final mask of final_masks/",
            )
    values = np.unique(sitk.GetArrayViewFromImage(labels))
    check_whole_labels(values, path)
    foreign = [int(v) for v in values if not 0 <= v <= k]
    if foreign:
        raise ScanError(path, f"label values {foreign} are not classes 1..{k} of the final masks")
    on_region = on_crop(labels, canonical)
    if not on_region.any():  # an empty layer saved by mistake would erase every slice of the final mask
        raise ScanError(
            path,
            "correction holds no labelled voxel in the scan's region: to undo a correction, remove the file",
        )
    return on_region


def on_crop(labels: sitk.Image, canonical: sitk.Image) -> np.ndarray:
    """Labels on the scan's original grid, on its canonical crop: the crop's voxels are the original's,
    reordered and cut to the region, so nearest neighbour is exact."""
    resampled = sitk.Resample(
        sitk.Cast(labels, sitk.sitkUInt8), canonical, sitk.Transform(), sitk.sitkNearestNeighbor, 0
    )
    return sitk.GetArrayFromImage(resampled)


def published_on_crop(
    layout: DatasetLayout, scan: str, original: sitk.Image, canonical: sitk.Image
) -> np.ndarray:
    """The published final mask, the file a user edits, on the scan's current crop. Read on the original
    grid, as the correction is: the canonical copy may be on an earlier crop of the same length, where a
    slice-by-slice comparison would set each slice against another level's."""
    published = layout.final_mask(scan)
    if published.exists():
        mask = read_image(published)
        if same_grid(mask, original):
            return on_crop(mask, canonical)
    return np.zeros(canonical.GetSize()[::-1], np.uint8)  # nothing published for this scan's grid


def differing_slices(a: np.ndarray, b: np.ndarray) -> list[int]:
    return [int(z) for z in np.flatnonzero((a != b).reshape(a.shape[0], -1).any(axis=1))]


@dataclass
class RecordedCorrections:
    changed: dict[str, CorrectionRecord]
    refused: dict[str, str]  # scan -> why its correction file cannot be used (its earlier record stays)
    removed: list[str]  # scans whose correction file was taken away: their final masks are the model's again

    @property
    def scans(self) -> list[str]:
        """The scans whose correction is new, changed or removed."""
        return sorted([*self.changed, *self.removed])

    @property
    def key(self) -> str:
        """What was recorded, for a run key: each changed record's key, each removal."""
        return cache_key(*(r.key for r in self.changed.values()), *(f"-{s}" for s in self.removed))


def record_corrections(spec: DatasetSpec, layout: DatasetLayout) -> RecordedCorrections:
    """Record each scan's new or changed correction against the final mask it was made from, and forget the
    records of corrections that were removed. A bad correction file is refused for its scan alone."""
    out = RecordedCorrections({}, {}, [])
    keys = ingest_keys(layout) if layout.manifest.exists() else {}
    for scan in sorted(keys):
        refused = _refused_marker(layout, scan)
        try:
            record = _record_one(spec, layout, scan, keys[scan])
        except Exception as exc:  # one bad file never stops the others' recording
            source = spec.scans[scan].correction if scan in spec.scans else None
            out.refused[scan] = str(exc) if isinstance(exc, ScanError) else f"{source or scan}: {exc!r}"
            if source is not None and source.exists():  # not pending again until the file changes
                refused.parent.mkdir(parents=True, exist_ok=True)
                refused.write_text(source_stat(source))
            continue
        refused.unlink(missing_ok=True)
        if record is REMOVED:
            out.removed.append(scan)
        elif record is not None:
            out.changed[scan] = record
    for path in layout.dir("corrections").glob("*.json") if layout.dir("corrections").exists() else []:
        # the scan left the dataset; one that failed this ingest, or that the dataset excludes for now (a bad
        # regions.csv row, a second file of the same name), keeps its record for when it comes back
        if path.stem not in spec.scans and path.stem not in spec.excluded:
            path.unlink()
            layout.correction_labels(path.stem).unlink(missing_ok=True)
    return out


REMOVED = CorrectionRecord("", "", "", None, [])  # _record_one's answer for a correction taken away


def _record_one(
    spec: DatasetSpec, layout: DatasetLayout, scan: str, ingest_key: str
) -> CorrectionRecord | None:
    if scan in spec.excluded:  # out for now, by the sensor's reading before the run re-ingests: not a removal
        return None
    source = spec.scans[scan].correction if scan in spec.scans else None
    previous = read_record(layout, scan)
    if source is None:
        if previous is None or previous.removed:
            return None
        atomic_write_json({**asdict(previous), "removed": True}, layout.correction_record(scan))
        return REMOVED
    spec.confined(source)  # before it is read whole for its digest: a link out of the data root is refused
    digest = sha256_file(source)
    same_file = previous is not None and previous.correction_sha256 == digest
    if same_file and previous.ingest_key == ingest_key and not previous.removed:
        if previous.source_stat != source_stat(source):  # touched, not changed
            atomic_write_json(
                {**asdict(previous), "source_stat": source_stat(source)}, layout.correction_record(scan)
            )
        return None
    canonical, original = read_image(layout.scan_image(scan)), read_image(spec.scans[scan].image)
    correction = read_correction(spec, scan, original, canonical)
    if same_file and not previous.removed:  # ingested again (a new region, new content): the same edits
        slices = set(_moved_slices(previous, canonical, correction, layout))
        base_digest = previous.base_mask_sha256
    else:
        published = published_on_crop(layout, scan, original, canonical)
        slices = set(differing_slices(correction, published))
        if previous is not None and not previous.removed:  # the published mask already carries those edits
            slices |= set(_moved_slices(previous, canonical, correction, layout))
        elif previous is not None:  # taken away and put back: its edits count where they are still published
            slices |= set(_still_published(previous, published, layout, ingest_key))
        base_digest = sha256_file(layout.final_mask(scan)) if layout.final_mask(scan).exists() else None
    record = CorrectionRecord(
        scan,
        str(source),
        digest,
        base_digest,
        sorted(slices),
        source_stat(source),
        ingest_key,
        [list(canonical.TransformIndexToPhysicalPoint((0, 0, z))) for z in sorted(slices)],
    )
    image = sitk.GetImageFromArray(correction)
    image.CopyInformation(canonical)
    atomic_write_image(image, layout.correction_labels(scan))
    atomic_write_json(asdict(record), layout.correction_record(scan))
    return record


def _still_published(
    previous: CorrectionRecord, published: np.ndarray, layout: DatasetLayout, ingest_key: str
) -> list[int]:
    """A removed record's slices that the published mask still carries (the final mask without them was not
    published yet). Without them, a file put back in the meantime would match the published mask there and
    its edits would be lost; once the mask without them is published, they are ordinary differences again."""
    labels = layout.correction_labels(previous.scan)
    if previous.ingest_key != ingest_key or not labels.exists():
        return []
    old = read_array(labels)
    if old.shape != published.shape:
        return []
    return [z for z in previous.corrected_slices if np.array_equal(old[z], published[z])]


def _moved_slices(
    previous: CorrectionRecord, canonical: sitk.Image, correction: np.ndarray, layout: DatasetLayout
) -> list[int]:
    """The previous record's corrected slices on the scan's current crop, by their positions; a slice the
    crop no longer holds is dropped. A record from before positions were kept stands as it is where its
    labels still fit the crop, and is refused where they do not."""
    if not previous.slice_points:
        labels = layout.correction_labels(previous.scan)
        if labels.exists() and read_array(labels).shape == correction.shape:
            return list(previous.corrected_slices)
        raise ScanError(
            previous.source,
            "recorded on an earlier crop of the scan: save the correction again to re-record it",
        )
    n, out = canonical.GetSize()[2], set()
    for point in previous.slice_points:
        z = canonical.TransformPhysicalPointToContinuousIndex(point)[2]
        if abs(z - round(z)) < 0.25 and 0 <= round(z) < n:
            out.add(int(round(z)))
    return sorted(out)


@dataclass(frozen=True)
class AppliedCorrection:
    mask: np.ndarray
    n_slices: int
    dice_before: float  # uncorrected vs correction on the corrected slices
    foreground_change: int  # foreground voxels after the correction minus before


def apply_correction(
    uncorrected: np.ndarray, layout: DatasetLayout, record: CorrectionRecord | None, n_classes: int
) -> AppliedCorrection | None:
    """The final mask with the recorded corrected slices replaced, or None when the scan has none."""
    if record is None or not record.corrected_slices:
        return None
    correction = read_array(layout.correction_labels(record.scan))
    if correction.shape != uncorrected.shape:  # numbered on another crop: placed on this one when recorded
        return None
    slices = record.corrected_slices
    mask = uncorrected.copy()
    mask[slices] = correction[slices]
    return AppliedCorrection(
        mask,
        len(slices),
        mean_dice(uncorrected[slices], correction[slices], n_classes),
        int((mask > 0).sum()) - int((uncorrected > 0).sum()),
    )


def corrected_exact_labels(layout: DatasetLayout) -> dict[str, tuple[list[int], Path]]:
    """{scan: (corrected slices, canonical label file)} of every recorded correction."""
    out = {}
    folder = layout.dir("corrections")
    keys = ingest_keys(layout) if folder.exists() else {}
    for path in sorted(folder.glob("*.json")) if folder.exists() else []:
        record = current_record(layout, path.stem, keys)
        if record is not None and record.corrected_slices:
            out[record.scan] = (record.corrected_slices, layout.correction_labels(record.scan))
    return out
