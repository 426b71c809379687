"""Scan ingest: read, validate, find or take the region, crop to it, canonicalise, pair Dixon, align expert
labels; the ``scans`` asset's per-dataset step (``ingest_scans``) and the readers of its manifest."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk

from nnsam2_assets.core import Log, silent
from nnsam2_assets.core.cache import ScanCache, cache_key
from nnsam2_assets.core.imaging import (
    Geometry,
    ScanError,
    align_labels,
    as_float32,
    axial_axis,
    check_acquisition,
    crop_region,
    pair_dixon,
    read_source_image,
    to_canonical,
)
from nnsam2_assets.core.labels import class_map
from nnsam2_assets.core.layout import DatasetLayout
from nnsam2_assets.core.overlays import sagittal_lines_png
from nnsam2_assets.core.storage import (
    StorageError,
    atomic_write_bytes,
    atomic_write_dataframe,
    atomic_write_image,
    remove_outputs,
    sha256_path,
    sha256_strings,
)
from nnsam2_assets.ingest import region_finding
from nnsam2_assets.ingest.convention import (
    DatasetSpec,
    ScanSource,
    check_whole_labels,
    map_labels_keep,
    owns_outputs,
)
from nnsam2_assets.ingest.regions import Region
from nnsam2_assets.ingest.slicer import is_slicer_segmentation, read_slicer_labels

# v4: a Dixon fat image stored with flipped or swapped axes is put in the water's axis order before pairing;
# a DICOM series off a regular grid (gantry tilt, a missing slice) is refused; expert labels that leave a class
# out get a warning
VERSION = "ingest-v4"


@dataclass
class PreparedScan:
    scan_id: str
    image: sitk.Image  # canonical region crop, float32, original units (water image for Dixon)
    fat: sitk.Image | None
    expert: sitk.Image | None  # canonical crop in our class ids
    original: Geometry  # geometry of the uncropped source scan, to undo the crop later
    region: Region | None
    region_source: str  # "regions.csv", "dataset.yaml", "found" or "whole scan"
    region_confidence: float | None = None  # of a found region
    region_uncertain: bool = False  # a found region with low confidence, odd geometry, or off the scan
    l4_l5_slice: int | None = None  # the L4/L5 disc's slice in the canonical crop (z up), if named
    region_preview: bytes = b""  # PNG: the region on a sagittal reformat of the whole scan
    notes: list[str] = field(default_factory=list)
    # things the user should look at (oblique, expert labels ignored, an uncertain found region)
    warnings: list[str] = field(default_factory=list)


class ReferenceForRegions:
    """The reference scan as read from its file, loaded once per ingest, for finding the other scans' regions."""

    def __init__(self, spec: DatasetSpec) -> None:
        self.spec = spec
        self._image: sitk.Image | None = None

    @property
    def image(self) -> sitk.Image:
        if self._image is None:
            self._image = read_source_image(self.spec.scans[self.spec.reference].image)
        return self._image


def region_inputs(spec: DatasetSpec, scan_id: str, content: bool) -> str:
    """What a scan's region depends on: its given region, or the reference's region and the reference's files
    (content hashes when ``content``, else file stats) when the region is found from them."""
    if scan_id in spec.regions:
        return f"given:{spec.regions[scan_id]}"
    if spec.reference_region is None or spec.reference not in spec.scans:
        return "whole scan"
    ref = spec.scans[spec.reference].image
    fingerprint = sha256_path(ref) if content else sha256_strings(_file_stats(ref))
    return f"found:{region_finding.VERSION}:{spec.reference_region}:{fingerprint}"


def _with_current_source(row: dict, spec: DatasetSpec, scan_id: str) -> dict:
    """A kept row with its given region's current source: the same region moved from dataset.yaml into
    regions.csv (or back) is the same crop, so the row is kept, but the manifest had gone on naming the old
    file."""
    return {**row, "region_source": spec.region_file(scan_id)} if scan_id in spec.regions else row


def _readable(path: Path, spec: DatasetSpec) -> bool:
    """Whether ``path`` lies under the data root or an allowed root (``NNSAM2_ALLOWED_ROOTS``)."""
    try:
        spec.confined(path)
    except ScanError:
        return False
    return True


def _expert_digest(path: Path, spec: DatasetSpec) -> str:
    """The expert file's content hash, or its path when it lies outside the readable roots: such a file is
    refused by ``prepare_scan`` and must not be read first (a link to a huge or never-ending file)."""
    return sha256_path(path) if _readable(path, spec) else f"outside the readable roots: {path}"


def source_hash(source: ScanSource, spec: DatasetSpec) -> str:
    """Content hash of everything a scan's ingest depends on (files, region, label map, modality)."""
    parts = [sha256_path(source.image)]
    if source.fat:
        parts.append(sha256_path(source.fat))
    if source.expert:
        parts.append(_expert_digest(source.expert, spec))
    parts += [
        region_inputs(spec, source.scan_id, content=True),
        str(sorted(spec.label_map.items())),
        str(sorted(spec.segment_names.items())),
        spec.modality,
    ]
    return sha256_strings(parts)


def prepare_scan(
    spec: DatasetSpec, source: ScanSource, reference: ReferenceForRegions | None = None
) -> PreparedScan:
    original = read_source_image(source.image)
    warnings = check_acquisition(original, source.image)
    notes: list[str] = []
    region = spec.regions.get(source.scan_id)
    confidence, uncertain = None, False
    if region:
        _check_region(spec, source, original)
        region_source = spec.region_file(source.scan_id)
    elif spec.reference_region is not None:
        reference = reference or ReferenceForRegions(spec)
        found = region_finding.find_region(reference.image, spec.reference_region, original)
        region, region_source, confidence = found.region, "found", found.confidence
        uncertain = found.uncertain
        notes.append(f"region found from the reference: {found.detail}")
        if found.uncertain:
            warnings.append(
                f"found region {region.describe()} is uncertain (confidence {confidence:.2f}; {found.detail}); "
                f"check it, or give the scan a row in {spec.folder / 'regions.csv'}"
            )
    else:
        region_source = "whole scan"

    def crop(img: sitk.Image, path: object) -> sitk.Image:
        return crop_region(img, region.first, region.last, path=str(path)) if region else img

    fat = None
    if spec.is_dixon:
        if source.fat is None:
            raise ScanError(source.image, "Dixon scan has no matching <id>_fat image")
        fat_img = read_source_image(source.fat)
        _check_contrast(fat_img, source.fat)
        fat_paired = pair_dixon(original, fat_img, source.image, source.fat)
        if not np.allclose(fat_img.GetDirection(), original.GetDirection(), atol=1e-3):
            notes.append(
                "fat image stored with flipped or swapped axes against the water's; reoriented to pair"
            )
        if not np.allclose(fat_img.GetOrigin(), original.GetOrigin(), atol=1e-2):
            notes.append("water and fat origins differ; paired by array index (shape and spacing match)")
        fat = to_canonical(crop(fat_paired, source.fat))
    if spec.modality == "mri" and original.GetPixelID() in (sitk.sitkUInt8, sitk.sitkInt8):
        notes.append("8-bit MRI: intensity resolution is low")
    image = as_float32(to_canonical(crop(original, source.image)))
    _check_contrast(image, source.image)

    expert = None
    if source.expert is not None:
        try:
            spec.confined(source.expert)
            expert = _prepare_expert(spec, source, original, crop)
        except ScanError as exc:  # optional: a bad expert file drops the comparison, never the scan
            warnings.append(f"expert labels ignored: {exc}")
        else:
            drawn = set(np.unique(sitk.GetArrayViewFromImage(expert)).tolist())
            missing = [name for c, name in class_map(spec.n_classes).items() if c not in drawn]
            if missing:
                warnings.append(
                    f"expert labels {source.expert} have no {', '.join(missing)} in the region: "
                    "not annotated, so left out of the comparison with the expert"
                )
    return PreparedScan(
        source.scan_id,
        image,
        fat,
        expert,
        Geometry.of(original),
        region,
        region_source,
        confidence,
        uncertain,
        _l4_l5_in_crop(original, region, image),
        _region_preview(original, region),
        notes,
        warnings,
    )


def _region_preview(original: sitk.Image, region: Region | None) -> bytes:
    """A mid-sagittal reformat of the whole scan with the region's discs drawn (red, yellow, cyan)."""
    canonical = to_canonical(original)
    lines = []
    for index in [] if region is None else [i for i in (*region.bounds, region.l4_l5) if i is not None]:
        lines.append(_canonical_slice(original, index, canonical))
    spacing = canonical.GetSpacing()
    return sagittal_lines_png(
        sitk.GetArrayViewFromImage(canonical), (spacing[2], spacing[1], spacing[0]), lines
    )


def _l4_l5_in_crop(original: sitk.Image, region: Region | None, crop: sitk.Image) -> int | None:
    """The canonical crop's slice holding the L4/L5 disc slice of the source file."""
    if region is None or region.l4_l5 is None:
        return None
    return _canonical_slice(original, region.l4_l5, crop)


def _canonical_slice(original: sitk.Image, axial_index: int, canonical: sitk.Image) -> int:
    """The slice of a canonical image (z up) that holds the source file's axial slice ``axial_index``."""
    point = region_finding.plane_point(original, axial_index)
    return int(round(canonical.TransformPhysicalPointToContinuousIndex(tuple(float(v) for v in point))[2]))


def _prepare_expert(spec: DatasetSpec, source: ScanSource, original: sitk.Image, crop) -> sitk.Image:
    if is_slicer_segmentation(source.expert):  # already in our class ids, on its own (cropped) grid
        classes = read_slicer_labels(source.expert, spec.label_map, spec.segment_names)
        arr = sitk.GetArrayFromImage(align_labels(classes, original, source.expert))
    else:
        raw = read_source_image(source.expert)
        check_whole_labels(sitk.GetArrayViewFromImage(raw), source.expert)
        aligned = align_labels(sitk.Cast(raw, sitk.sitkInt32), original, source.expert)
        arr = map_labels_keep(sitk.GetArrayFromImage(aligned), spec.label_map)
    mapped = sitk.GetImageFromArray(arr)
    mapped.CopyInformation(original)
    return sitk.Cast(to_canonical(crop(mapped, source.expert)), sitk.sitkUInt8)


def _check_region(spec: DatasetSpec, source: ScanSource, original: sitk.Image) -> None:
    """A given region must lie inside the scan; the error names regions.csv and the row (or dataset.yaml)."""
    region = spec.regions[source.scan_id]
    n = original.GetSize()[axial_axis(original)]
    if max(region.bounds) >= n:
        row = spec.region_rows.get(source.scan_id)
        raise ScanError(
            spec.folder / spec.region_file(source.scan_id),
            (f"row {row}, columns first_slice/last_slice" if row is not None else "key region")
            + f": slices {region.first}..{region.last} lie outside the {n} axial slices (0..{n - 1}) of "
            f"{source.image}",
        )


def _check_contrast(img: sitk.Image, path: object) -> None:
    arr = sitk.GetArrayViewFromImage(img)
    if float(arr.max()) == float(arr.min()):
        raise ScanError(str(path), f"image is constant ({float(arr.max()):g} everywhere: no contrast)")


def remove_scan_outputs(layout: DatasetLayout, scan_id: str, dixon: bool) -> list[Path]:
    """Delete every artefact and cache entry of a scan that no longer ingests, so nothing downstream
    reads a result of the scan's earlier, now unreadable, content."""
    return remove_outputs(layout.scan_outputs(scan_id, dixon))


def read_manifest(layout: DatasetLayout) -> pd.DataFrame:
    if not layout.manifest.exists():
        return pd.DataFrame(columns=["status"]).rename_axis("scan")
    return pd.read_parquet(layout.manifest).set_index("scan")


def ok_scans(layout: DatasetLayout, manifest: pd.DataFrame | None = None) -> list[str]:
    """Scans that passed ingest; pass the ``read_manifest`` result when the caller has it already."""
    manifest = read_manifest(layout) if manifest is None else manifest
    return sorted(manifest.index[manifest.status == "ok"].tolist())


@dataclass
class IngestReport:
    manifest: pd.DataFrame
    computed: int

    @property
    def good(self) -> pd.DataFrame:
        return self.manifest[self.manifest.status == "ok"]

    @property
    def failed(self) -> pd.DataFrame:
        return self.manifest[self.manifest.status != "ok"]

    @property
    def data_version(self) -> str:
        return cache_key(*sorted(f"{r.scan}:{r.source_hash}" for r in self.good.itertuples()))


def _file_stats(path: Path) -> list[str]:
    files = sorted(p for p in Path(path).rglob("*") if p.is_file()) if Path(path).is_dir() else [Path(path)]
    out = []
    for f in files:
        st = os.stat(f)
        # ctime as well: `cp -p` or `rsync -t` over an existing file keeps size, mtime and inode, but
        # no user call can set ctime back
        out.append(f"{f}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:{st.st_ino}")
    return out


def stat_signature(source: ScanSource, spec: DatasetSpec) -> str:
    """Size, mtime, ctime and inode of a scan's files plus its ingest settings. Like git's index: when it matches
    the recorded one, the content hash recorded with it is reused instead of re-reading every source file
    on every run (tens of MB per scan)."""
    parts: list[str] = []
    for path in (source.image, source.fat, source.expert):
        if path is not None:
            parts += _file_stats(path)
    if source.expert is not None:  # allowing or removing a root changes whether it is read, not its stats
        parts.append(f"expert readable: {_readable(source.expert, spec)}")
    parts += [
        VERSION,  # a new ingest version re-prepares the scans even where no file changed
        region_inputs(spec, source.scan_id, content=False),
        str(sorted(spec.label_map.items())),
        str(sorted(spec.segment_names.items())),
        spec.modality,
    ]
    return sha256_strings(parts)


def _under_storage(exc: BaseException, layout: DatasetLayout) -> bool:
    name = getattr(exc, "filename", None) if isinstance(exc, OSError) else None
    return name is not None and Path(os.fsdecode(name)).resolve().is_relative_to(Path(layout.root).resolve())


def ingest_scans(spec: DatasetSpec, layout: DatasetLayout, log: Log = silent) -> IngestReport:
    """Every scan reoriented to LPS and cropped to its region; a bad scan becomes an error row, not a failure."""
    cache = ScanCache(layout.dir("scans"))
    reference = ReferenceForRegions(spec)
    rows, computed = [], 0
    for scan_id, source in spec.scans.items():
        outputs = [layout.scan_image(scan_id), layout.scan_region_preview(scan_id)]
        try:
            signature = stat_signature(source, spec)
            info = cache.info(scan_id)
            if (
                info
                and info.get("stat") == signature
                and cache.is_fresh(scan_id, info["row"]["source_hash"], outputs)
            ):
                rows.append(_with_current_source(info["row"], spec, scan_id))
                continue
            key = cache_key(VERSION, source_hash(source, spec))
            if info and cache.is_fresh(scan_id, key, outputs):  # touched, same content
                row = _with_current_source(info["row"], spec, scan_id)
                cache.record(scan_id, key, {"stat": signature, "row": row})
                rows.append(row)
                continue
            prepared = prepare_scan(spec, source, reference)
            cache.invalidate(scan_id)
            atomic_write_image(prepared.image, layout.scan_image(scan_id))
            # a fat image or expert labels the scan no longer has (removed, or now refused) must not stay
            # behind: every later step takes the stored file's presence as the scan having one
            stores = [(prepared.expert, layout.scan_expert(scan_id))]
            if spec.is_dixon:  # elsewhere <scan>_fat may be another scan's own image
                stores.append((prepared.fat, layout.scan_fat(scan_id)))
            for image, stored in stores:
                if image is not None:
                    atomic_write_image(image, stored)
                else:
                    stored.unlink(missing_ok=True)
            atomic_write_bytes(prepared.region_preview, layout.scan_region_preview(scan_id))
            size = prepared.image.GetSize()
            row = {
                "scan": scan_id,
                "status": "ok",
                "error": "",
                "source": str(source.image),
                "source_hash": key,
                "shape_zyx": f"{size[2]}x{size[1]}x{size[0]}",
                "spacing_mm": ",".join(f"{s:.3f}" for s in prepared.image.GetSpacing()),
                "original_orientation": prepared.original.orientation(),
                "region": "" if prepared.region is None else "-".join(map(str, prepared.region.bounds)),
                "region_source": prepared.region_source,
                "region_confidence": prepared.region_confidence,
                "region_uncertain": prepared.region_uncertain,
                "l4_l5": prepared.region.l4_l5 if prepared.region else None,
                "l4_l5_slice": prepared.l4_l5_slice,
                "has_fat": prepared.fat is not None,
                "has_expert": prepared.expert is not None,
                "notes": "; ".join(prepared.notes),
                "warnings": "; ".join(prepared.warnings),
            }
            cache.record(scan_id, key, {"stat": signature, "row": row})
            computed += 1
            rows.append(row)
        except (ValueError, RuntimeError, MemoryError, OSError) as exc:
            # SimpleITK raises RuntimeError, a value a file holds that the readers cannot parse ValueError,
            # a scan too large for the machine MemoryError, and a file the process may not read (another
            # user's, on a shared data root) OSError, deep in the preparation: one scan's failure stays its
            # own (it had failed the dataset's whole ingest). A failed write or read under the storage root is
            # the storage's, not the scan's: it fails the step
            if isinstance(exc, StorageError) or _under_storage(exc, layout):
                raise
            if not isinstance(exc, ScanError):
                exc = ScanError(source.image, f"could not be prepared ({type(exc).__name__}: {exc})")
            log(f"scan {scan_id} excluded: {exc}")
            rows.append({"scan": scan_id, "status": "error", "error": str(exc), "source": str(source.image)})
            remove_scan_outputs(layout, scan_id, spec.is_dixon)
    for name, reason in spec.excluded.items():
        log(f"scan {name} excluded: {reason}")
        rows.append({"scan": name, "status": "error", "error": reason, "source": ""})
        if owns_outputs(name, spec.is_dixon):  # an invalid name never had outputs, nor has a Dixon x_fat
            remove_scan_outputs(layout, name, spec.is_dixon)
    cache.forget_others({row["scan"] for row in rows if row["status"] == "ok"})
    manifest = pd.DataFrame(rows).fillna({"error": "", "notes": "", "warnings": ""})
    atomic_write_dataframe(manifest, layout.manifest)
    return IngestReport(manifest, computed)
