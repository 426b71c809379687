"""Scan ingest: read, validate, crop to the region, canonicalise, pair Dixon, align expert labels."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk

from nnsam2_assets.lib.dataset import DatasetSpec, ScanSource, map_labels_keep
from nnsam2_assets.lib.imaging import (
    Geometry,
    ScanError,
    align_labels,
    as_float32,
    crop_region,
    pair_dixon,
    read_image,
    to_canonical,
)
from nnsam2_assets.lib.storage import sha256_path, sha256_strings


@dataclass
class PreparedScan:
    scan_id: str
    image: sitk.Image  # canonical region crop, float32, original units (water image for Dixon)
    fat: sitk.Image | None
    expert: sitk.Image | None  # canonical crop in our class ids
    original: Geometry  # geometry of the uncropped source scan, to undo the crop later
    region: tuple[int, int] | None
    notes: list[str] = field(default_factory=list)


def source_hash(source: ScanSource, spec: DatasetSpec) -> str:
    """Content hash of everything a scan's ingest depends on (files, region, label map, modality)."""
    parts = [sha256_path(source.image)]
    if source.fat:
        parts.append(sha256_path(source.fat))
    if source.expert:
        parts.append(sha256_path(source.expert))
    parts += [str(spec.regions.get(source.scan_id)), str(sorted(spec.label_map.items())), spec.modality]
    return sha256_strings(parts)


def prepare_scan(spec: DatasetSpec, source: ScanSource) -> PreparedScan:
    original = read_image(source.image)
    notes: list[str] = []
    region = spec.regions.get(source.scan_id)

    def crop(img: sitk.Image, path: object) -> sitk.Image:
        return crop_region(img, *region, path=str(path)) if region else img

    fat = None
    if spec.is_dixon:
        if source.fat is None:
            raise ScanError(source.image, "Dixon scan has no matching <id>_fat image")
        fat_img = read_image(source.fat)
        fat_paired = pair_dixon(original, fat_img, source.image, source.fat)
        if not np.allclose(fat_img.GetOrigin(), original.GetOrigin(), atol=1e-2):
            notes.append("water and fat origins differ; paired by array index (shape and spacing match)")
        fat = to_canonical(crop(fat_paired, source.fat))
    if spec.modality == "mri" and original.GetPixelID() in (sitk.sitkUInt8, sitk.sitkInt8):
        notes.append("8-bit MRI: intensity resolution is low")
    image = as_float32(to_canonical(crop(original, source.image)))
    _check_finite(image, source.image)

    expert = None
    if source.expert is not None:
        raw = read_image(source.expert)
        aligned = align_labels(sitk.Cast(raw, sitk.sitkInt32), original, source.expert)
        arr = map_labels_keep(sitk.GetArrayFromImage(aligned), spec.label_map)
        mapped = sitk.GetImageFromArray(arr)
        mapped.CopyInformation(original)
        expert = sitk.Cast(to_canonical(crop(mapped, source.expert)), sitk.sitkUInt8)
    return PreparedScan(source.scan_id, image, fat, expert, Geometry.of(original), region, notes)


def _check_finite(img: sitk.Image, path: object) -> None:
    arr = sitk.GetArrayViewFromImage(img)
    if not np.isfinite(arr).all():
        raise ScanError(str(path), "image holds NaN or infinite values")
    if float(arr.max()) == float(arr.min()):
        raise ScanError(str(path), "image is constant (no contrast)")
