"""Mask clean-up: the largest 3-D component per class, holes filled, and how fragmented a mask is."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from scipy import ndimage

from nnsam2_assets.core.labels import CLASSES_4, side_ids


def largest_component(mask: np.ndarray) -> np.ndarray:
    """Largest face-connected component of a binary mask, 2-D or 3-D (ties: the first in raster order)."""
    lab, n = ndimage.label(mask)
    if n <= 1:
        return mask.astype(bool)
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    return lab == int(np.argmax(sizes))


def clean_labels(labels: np.ndarray, n_classes: int, fill_holes: bool = True) -> np.ndarray:
    """Keep the largest 3-D component of each class and fill its holes slice by slice (``labels``: z, y, x;
    ``place_classes``)."""
    kept = {c: largest_component(labels == c) for c in range(1, n_classes + 1)}
    return place_classes(kept, labels.shape, fill_holes)


def clean_class_masks(labels: np.ndarray, n_classes: int) -> np.ndarray:
    """A propagated mask as either backend leaves it: per class, the largest component per slice (2-D) and
    in 3-D, then holes filled where no class keeps a voxel (``place_classes``); classes never overlap."""
    kept = {
        c: largest_component(np.stack([largest_component(s) for s in labels == c]))
        for c in range(1, n_classes + 1)
    }
    return place_classes(kept, labels.shape)


def place_classes(
    kept: Mapping[int, np.ndarray], shape: tuple[int, ...], fill_holes: bool = True
) -> np.ndarray:
    """A label volume (z, y, x) of each class's ``kept`` voxels (disjoint masks), then, slice by slice, each
    class's holes filled where no class keeps a voxel: a class lying inside another's outline keeps every
    voxel whatever the two ids, and a pocket enclosed by several classes goes to the innermost."""
    out = np.zeros(shape, dtype=np.uint8)
    for c, mask in kept.items():
        out[mask] = c
    if not fill_holes:
        return out
    for z in range(out.shape[0]):
        filled = {c: ndimage.binary_fill_holes(m[z]) for c, m in kept.items() if m[z].any()}
        # the smallest filled outline is the innermost: a pocket inside class b inside class a is b's hole
        for c in sorted(filled, key=lambda c: int(filled[c].sum())):
            out[z][filled[c] & (out[z] == 0)] = c
    return out


def fragment_fraction(labels: np.ndarray, n_classes: int) -> float:
    """Worst class's share of voxels outside its largest component (0 = one piece per class)."""
    worst = 0.0
    for c in range(1, n_classes + 1):
        mask = labels == c
        total = int(mask.sum())
        if total:
            worst = max(worst, 1.0 - int(largest_component(mask).sum()) / total)
    return worst


def split_sides(
    sides: np.ndarray, muscles: np.ndarray, spacing_zyx: tuple[float, float, float]
) -> np.ndarray:
    """2-class side masks -> 4-class muscles, each side voxel taking the class of the nearest voxel of the
    same side's muscles in ``muscles`` (a 4-class mask of the same scan, e.g. its propagation).

    The side boundary comes from ``sides`` and only the ES/MF interface inside each side from ``muscles``, so
    a 4-class dataset refined by a 2-class model keeps its per-muscle classes. A side that ``muscles`` lacks
    entirely is labelled erector spinae, the larger muscle."""
    out = np.zeros(sides.shape, dtype=np.uint8)
    for side in ("right", "left"):
        (side_id,) = side_ids(2, side)
        region = sides == side_id
        if not region.any():
            continue
        members = side_ids(4, side)
        template = np.isin(muscles, members)
        if not template.any():
            out[region] = CLASSES_4.index(f"{side}_es") + 1
            continue
        _, nearest = ndimage.distance_transform_edt(~template, sampling=spacing_zyx, return_indices=True)
        out[region] = muscles[tuple(index[region] for index in nearest)]
    return out


def laterality_gap_voxels(canonical_labels: np.ndarray, n_classes: int) -> float | None:
    """Mean x index of the left-side classes minus that of the right-side classes, on a canonical (LPS)
    array, where x grows towards the patient's left: positive when the sides lie where they belong, negative
    when right and left are swapped. None when a side is empty.

    A swap leaves propagation confident (the shapes match), so only patient coordinates can reveal it."""
    x = np.arange(canonical_labels.shape[-1])
    centres = {}
    for side in ("right", "left"):
        columns = np.isin(canonical_labels, side_ids(n_classes, side)).sum(
            axis=tuple(range(canonical_labels.ndim - 1))
        )
        if not columns.any():
            return None
        centres[side] = float((columns * x).sum() / columns.sum())
    return centres["left"] - centres["right"]
