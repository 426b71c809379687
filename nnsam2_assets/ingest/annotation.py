"""The one reference annotation: validated against the reference scan, cropped to its region and put on its
canonical grid (the ``reference_annotation`` asset's step), and the reader of what it recorded."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from nnsam2_assets.core.cache import cache_key
from nnsam2_assets.core.imaging import (
    ScanError,
    axial_axis,
    crop_region,
    read_array,
    read_image,
    read_source_image,
    same_grid,
    to_canonical,
)
from nnsam2_assets.core.layout import DatasetLayout
from nnsam2_assets.core.masks import laterality_gap_voxels
from nnsam2_assets.core.storage import atomic_write_image, atomic_write_json, sha256_file
from nnsam2_assets.ingest.click_masks import mask_from_clicks
from nnsam2_assets.ingest.clicks import SliceClicks, is_click_file, place_clicks, read_clicks
from nnsam2_assets.ingest.convention import DatasetSpec, map_labels
from nnsam2_assets.ingest.scans import ok_scans
from nnsam2_assets.ingest.slicer import is_slicer_segmentation, read_slicer_labels

MAX_ANNOTATED_SLICES = 5  # each slice is a prompt; a label volume with more is an expert segmentation


@dataclass(frozen=True)
class Annotation:
    labels: sitk.Image  # canonical, our class ids, uint8
    seed_slice: int  # canonical z of the primary annotated slice (nearest the region's middle)
    classes_present: tuple[int, ...]
    annotated_slices: tuple[int, ...]  # canonical z of every annotated slice (the primary among them)


def primary_slice(slices: tuple[int, ...], n_slices: int) -> int:
    """The annotated slice nearest the middle of the region: the one the held-out check scores on."""
    return min(slices, key=lambda z: (abs(2 * z - (n_slices - 1)), z))


def validate_annotation(
    annotation: sitk.Image,
    reference_original: sitk.Image,
    spec: DatasetSpec,
    annotation_path: Path,
) -> Annotation:
    """Check the annotation against the reference scan, crop it to the region and canonicalise it.

    Rules: same voxel grid as the reference scan file; one non-empty axial slice, or a few (at most
    ``MAX_ANNOTATED_SLICES``, each a prompt); each inside the reference's region with every class present and
    right and left in place; no label values outside the map.
    """
    if not same_grid(annotation, reference_original):
        raise ScanError(
            annotation_path,
            f"annotation is not on the reference scan's grid (annotation size {annotation.GetSize()}, spacing "
            f"{tuple(round(s, 3) for s in annotation.GetSpacing())}; reference {spec.reference!r} size "
            f"{reference_original.GetSize()}, spacing {tuple(round(s, 3) for s in reference_original.GetSpacing())})",
        )
    mapped_full = (
        sitk.GetArrayFromImage(annotation)  # a Slicer segmentation arrives in our class ids
        if is_slicer_segmentation(annotation_path)
        else map_labels(sitk.GetArrayFromImage(annotation), spec.label_map, annotation_path)
    )
    axis_np = 2 - axial_axis(annotation)  # numpy axis of the axial index axis
    per_slice = np.moveaxis(mapped_full, axis_np, 0).reshape(mapped_full.shape[axis_np], -1).any(axis=1)
    nonempty = np.flatnonzero(per_slice)
    if len(nonempty) == 0:
        raise ScanError(annotation_path, "annotation is empty: draw the muscles on one axial slice")
    if len(nonempty) > MAX_ANNOTATED_SLICES:
        raise ScanError(
            annotation_path,
            f"annotation covers {len(nonempty)} axial slices (indices {nonempty.tolist()[:10]}); "
            f"one annotated slice is expected, at most {MAX_ANNOTATED_SLICES}",
        )
    mapped_img = sitk.GetImageFromArray(mapped_full)
    mapped_img.CopyInformation(annotation)
    if spec.reference in spec.regions:
        region = spec.regions[spec.reference]
        lo, hi = region.bounds
        for z in nonempty.tolist():
            if not lo <= z <= hi:
                raise ScanError(
                    annotation_path,
                    f"annotated slice {z} lies outside the reference's region {lo}..{hi} "
                    f"({spec.region_origin(spec.reference)})",
                )
        mapped_img = crop_region(mapped_img, region.first, region.last, annotation_path)
    canonical = to_canonical(mapped_img)
    arr = sitk.GetArrayFromImage(canonical)
    slices = tuple(int(z) for z in np.flatnonzero(arr.reshape(arr.shape[0], -1).any(axis=1)))
    present: tuple[int, ...] = ()
    for z in slices:
        where = f" (canonical slice {z})" if len(slices) > 1 else ""
        present = check_annotated_slice(arr[z], spec, annotation_path, where)
    seed = primary_slice(slices, arr.shape[0])
    return Annotation(sitk.Cast(canonical, sitk.sitkUInt8), seed, present, slices)


LABELS_SWAPPED = "right and left are swapped in the labels or in dataset.yaml's label_map"
# click files carry no label_map; the likely slip is coordinates copied from Slicer's display, which is RAS
CLICKS_SWAPPED = (
    "right and left are swapped in the click classes, or the points are in RAS: a click CSV's x, y, z are "
    "LPS (negate x and y of RAS), and a markups file says its coordinateSystem"
)


def check_annotated_slice(
    labels: np.ndarray, spec: DatasetSpec, path: Path, where: str = "", swapped: str = LABELS_SWAPPED
) -> tuple[int, ...]:
    """Every class present on a canonical annotated slice, right and left where they belong; returns the
    classes present. ``where`` names the slice in messages when there are several; ``swapped`` says what
    a swap of the sides most likely is in this kind of file."""
    present = tuple(int(v) for v in np.unique(labels) if v)
    missing = sorted(set(range(1, spec.n_classes + 1)) - set(present))
    if missing:
        names = [spec.class_names[m - 1] for m in missing]
        raise ScanError(path, f"annotation lacks class(es) {names} on its annotated slice{where}")
    gap = laterality_gap_voxels(labels, spec.n_classes)
    if gap is not None and gap < 0:
        raise ScanError(
            path,
            f"the right-side classes lie on the patient's left of the left-side classes{where} (in the "
            f"scan's own patient coordinates, by {-gap:.0f} voxels): {swapped}",
        )
    return present


def annotation_from_clicks(spec: DatasetSpec, layout: DatasetLayout) -> tuple[Annotation, SliceClicks]:
    """Click prompts placed on the reference's canonical crop, and the slice mask the weight-free random
    walker makes of them (``ingest.click_masks``)."""
    reference = read_image(layout.scan_image(spec.reference))
    clicks = place_clicks(
        read_clicks(spec.annotation, spec.class_names),
        reference,
        spec.annotation,
        f"the reference scan {spec.reference!r} (its region)",
    )
    volume = sitk.GetArrayFromImage(reference)
    labels = np.zeros(volume.shape, np.uint8)
    labels[clicks.slice] = mask_from_clicks(
        volume, clicks, spec.n_classes, spec.modality, reference.GetSpacing()[:2]
    )
    present = check_annotated_slice(labels[clicks.slice], spec, spec.annotation, swapped=CLICKS_SWAPPED)
    image = sitk.GetImageFromArray(labels)
    image.CopyInformation(reference)
    return Annotation(image, clicks.slice, present, (clicks.slice,)), clicks


def read_annotation_file(spec: DatasetSpec, reference_original: sitk.Image) -> sitk.Image:
    """The annotation as stored: NIfTI in the user's label ids, or a .seg.nrrd in our class ids on the
    reference's grid (padded there when Slicer cropped it to the segments' extent)."""
    if is_slicer_segmentation(spec.annotation):
        return read_slicer_labels(
            spec.annotation, spec.label_map, spec.segment_names, grid=reference_original
        )
    return read_source_image(spec.annotation)


def read_annotation_meta(layout: DatasetLayout) -> dict:
    return json.loads(layout.annotation_meta.read_text())


def annotated_slices(meta: dict) -> tuple[int, ...]:
    """Every annotated slice of the reference (canonical z); the primary ``seed_slice`` among them."""
    return tuple(int(z) for z in meta.get("annotated_slices", [meta["seed_slice"]]))


def describe_split_source(slices: list[int] | None) -> str:
    """Where a dataset's final masks take the erector spinae / multifidus split from, as the report and the
    final masks' metadata word it: the annotated slices, none for 2-class masks, or unknown when the record
    predates the field (``None``)."""
    if slices is None:
        return "unknown (final masks written before it was recorded: materialize final_masks again)"
    if not slices:
        return "none (2-class masks)"
    # the numbers are the region crop's (from its inferior end), not the reference file's own slice numbers
    listed = ", ".join(str(z) for z in slices)
    return f"annotated slice{'s' if len(slices) > 1 else ''} {listed} of the reference's region, from its inferior end"


def read_annotation_clicks(layout: DatasetLayout) -> SliceClicks | None:
    """The click prompts the annotation was made from, or None for a drawn annotation."""
    if not layout.annotation_clicks.exists():
        return None
    return SliceClicks.from_json(json.loads(layout.annotation_clicks.read_text()))


# the annotation asset's code: validation, click-made masks (``click_masks``) and placement on the crop
VERSION = "annotation-v1"


@dataclass
class AnnotationReport:
    meta: dict
    reference_slice: np.ndarray  # the annotated slice of the reference (canonical crop)
    label_slice: np.ndarray
    n_slices: int
    data_version: str


def write_reference_annotation(spec: DatasetSpec, layout: DatasetLayout) -> AnnotationReport:
    """The one annotated axial slice, validated against the reference scan and put on its canonical crop."""
    if spec.reference not in set(ok_scans(layout)):
        raise ScanError(
            spec.scans[spec.reference].image, "the reference scan failed ingest (see the scans asset)"
        )
    clicks = None
    if is_click_file(spec.annotation):
        annotation, clicks = annotation_from_clicks(spec, layout)
        atomic_write_json(clicks.to_json(), layout.annotation_clicks)
    else:
        reference_original = read_image(spec.scans[spec.reference].image)
        annotation = validate_annotation(
            read_annotation_file(spec, reference_original), reference_original, spec, spec.annotation
        )
        layout.annotation_clicks.unlink(missing_ok=True)
    atomic_write_image(annotation.labels, layout.annotation)
    ann_hash = sha256_file(spec.annotation)
    meta = {
        "reference": spec.reference,
        "seed_slice": annotation.seed_slice,
        "annotated_slices": list(annotation.annotated_slices),
        "n_classes": spec.n_classes,
        "annotation_sha256": ann_hash,
        "source": str(spec.annotation),
        "prompt": "clicks" if clicks else "mask",
        "n_clicks": len(clicks.rows) if clicks else 0,
    }
    atomic_write_json(meta, layout.annotation_meta)
    ref = read_array(layout.scan_image(spec.reference))
    z = annotation.seed_slice
    return AnnotationReport(
        meta,
        ref[z],
        sitk.GetArrayFromImage(annotation.labels)[z],
        int(ref.shape[0]),
        # what was written, not the user's file: a new label map, a click-made mask of new voxels or a moved
        # crop change the slice the pipeline reads while the file stays as it was
        cache_key(
            sha256_file(layout.annotation),
            spec.reference,
            annotation.seed_slice,
            *annotation.annotated_slices,
            sha256_file(layout.annotation_clicks) if clicks else "",
        ),
    )
