"""3D Slicer segmentations (``.seg.nrrd``) as label files: the annotation or an expert's labels.

A ``.seg.nrrd`` is an NRRD label volume whose header lists the segments (``Segment<i>_Name``,
``_LabelValue``, ``_Layer``). Slicer stores non-overlapping segments in one layer and crops the volume to
the segments' extent, so the file's grid is a sub-box of the scan's: same spacing and direction, its origin
on a voxel of the scan's grid. Read with SimpleITK and its header (the format is plain NRRD).

A segment maps to a class by its name when ``dataset.yaml``'s ``label_map`` has that name as a key, else by
its label value as a numeric key. Refused, naming the file: a segment neither name nor value maps, voxels of
an undeclared value, overlapping segments (more than one layer), and a grid whose spacing or direction
differs from the scan's or whose origin is off its voxel grid.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from nnsam2_assets.core.imaging import ScanError, check_claimed_voxels

SEG_SUFFIX = ".seg.nrrd"
_SEGMENT_KEY = re.compile(r"^Segment(\d+)_(Name|LabelValue|Layer)$")
GRID_TOLERANCE = 1e-3  # mm and direction cosines; an origin this close to a voxel centre is on it


def is_slicer_segmentation(path: Path | str) -> bool:
    return str(path).endswith(SEG_SUFFIX)


@dataclass(frozen=True)
class Segment:
    name: str
    label_value: int
    layer: int


def read_segments(image: sitk.Image, path: Path | str) -> list[Segment]:
    fields: dict[int, dict[str, str]] = {}
    for key in image.GetMetaDataKeys():
        match = _SEGMENT_KEY.match(key)
        if match:
            fields.setdefault(int(match[1]), {})[match[2]] = image.GetMetaData(key).strip()
    if not fields:
        raise ScanError(path, "no segments in the header (expected Segment<i>_Name / _LabelValue fields)")
    segments = []
    for index, entry in sorted(fields.items()):
        try:
            value, layer = int(entry.get("LabelValue", index + 1)), int(entry.get("Layer", 0))
        except ValueError as exc:
            raise ScanError(
                path, f"segment {index}: label value or layer is not an integer ({entry})"
            ) from exc
        segments.append(Segment(entry.get("Name", f"Segment_{index + 1}"), value, layer))
    return segments


MAX_SEGMENTS = 255  # more than a uint8 class map can tell apart


def read_slicer_labels(
    path: Path | str,
    label_map: dict[int, int],
    segment_names: dict[str, int],
    grid: sitk.Image | None = None,
) -> sitk.Image:
    """The segmentation in our class ids (uint8): on ``grid`` when given (a cropped file is padded onto it),
    else on the file's own grid."""
    check_claimed_voxels(path)  # a few hundred KB compressed can claim gigabytes
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise ScanError(path, f"unreadable segmentation ({str(exc).strip().splitlines()[-1][:200]})") from exc
    segments = read_segments(image, path)
    if len(segments) > MAX_SEGMENTS:  # each is a pass over the volume: a crafted header lists thousands
        raise ScanError(path, f"{len(segments)} segments in the header; a muscle segmentation has a few")
    layers = sorted({s.layer for s in segments})
    if image.GetNumberOfComponentsPerPixel() > 1 or len(layers) > 1:
        raise ScanError(
            path,
            f"overlapping segments ({max(len(layers), image.GetNumberOfComponentsPerPixel())} layers): a voxel "
            "may belong to one class only; remove the overlap in Slicer (Segment Editor, masking 'outside "
            "all segments')",
        )
    if image.GetDimension() != 3:
        raise ScanError(path, f"expected a 3-D segmentation, got {image.GetDimension()}-D")
    by_value: dict[int, str] = {}
    for segment in segments:  # a merge of files can leave two segments on one value: whose voxels are they?
        other = by_value.setdefault(segment.label_value, segment.name)
        if other != segment.name:
            raise ScanError(
                path,
                f"segments {other!r} and {segment.name!r} share label value {segment.label_value}: give each "
                "its own value (in Slicer, export the segmentation again)",
            )
    values = sitk.GetArrayFromImage(image)
    classes = np.zeros(values.shape, np.uint8)
    for segment in segments:
        target = segment_names.get(segment.name, label_map.get(segment.label_value))
        if target is None:
            raise ScanError(
                path,
                f"segment {segment.name!r} (label value {segment.label_value}) is not in the dataset's "
                f"label_map (names {sorted(segment_names)}, ids {sorted(label_map)})",
            )
        classes[values == segment.label_value] = target
    undeclared = sorted(set(np.unique(values).tolist()) - {0} - {s.label_value for s in segments})
    if undeclared:
        raise ScanError(path, f"voxel values {undeclared[:10]} belong to no segment of the header")
    out = sitk.GetImageFromArray(classes)
    out.CopyInformation(image)
    return out if grid is None else onto_grid(out, grid, path)


def onto_grid(labels: sitk.Image, grid: sitk.Image, path: Path | str) -> sitk.Image:
    """Pad a segmentation cropped to its extent back onto the scan's grid (nothing is resampled)."""
    if not np.allclose(labels.GetSpacing(), grid.GetSpacing(), atol=GRID_TOLERANCE):
        raise ScanError(
            path,
            f"spacing {tuple(round(s, 4) for s in labels.GetSpacing())} differs from the scan's "
            f"{tuple(round(s, 4) for s in grid.GetSpacing())}",
        )
    if not np.allclose(labels.GetDirection(), grid.GetDirection(), atol=GRID_TOLERANCE):
        raise ScanError(path, "direction differs from the scan's (segment the scan itself, not a reformat)")
    start = np.array(grid.TransformPhysicalPointToContinuousIndex(labels.GetOrigin()))
    if not np.allclose(start, np.round(start), atol=GRID_TOLERANCE):
        raise ScanError(
            path,
            f"origin {tuple(round(o, 3) for o in labels.GetOrigin())} is not on a voxel of the scan's grid",
        )
    lo = np.round(start).astype(int)
    hi = lo + np.array(labels.GetSize())
    if (lo < 0).any() or (hi > np.array(grid.GetSize())).any():
        raise ScanError(path, f"extent {lo.tolist()}..{(hi - 1).tolist()} reaches outside the scan's grid")
    full = np.zeros(grid.GetSize()[::-1], np.uint8)
    full[lo[2] : hi[2], lo[1] : hi[1], lo[0] : hi[0]] = sitk.GetArrayViewFromImage(labels)
    out = sitk.GetImageFromArray(full)
    out.CopyInformation(grid)
    return out
