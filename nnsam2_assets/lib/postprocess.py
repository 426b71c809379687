"""Mask clean-up shared by the final masks: largest 3-D component per class, holes filled."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
from scipy import ndimage


def largest_component(mask: np.ndarray) -> np.ndarray:
    """Largest face-connected component of a binary mask (SimpleITK, as the reference's step 7)."""
    if not mask.any():
        return mask.astype(bool)
    cc = sitk.ConnectedComponent(sitk.GetImageFromArray(mask.astype(np.uint8)), False)
    relabelled = sitk.GetArrayFromImage(sitk.RelabelComponent(cc, sortByObjectSize=True))
    return relabelled == 1


def clean_labels(labels: np.ndarray, n_classes: int, fill_holes: bool = True) -> np.ndarray:
    """Keep the largest component of each class and fill its holes slice by slice (never across classes)."""
    out = np.zeros_like(labels, dtype=np.uint8)
    for c in range(1, n_classes + 1):
        comp = largest_component(labels == c)
        if fill_holes and comp.any():
            comp = np.stack([ndimage.binary_fill_holes(s) for s in comp])
        out[comp & (out == 0)] = c
    return out


def to_class_space(
    labels: np.ndarray, from_classes: int, to_classes: int, ignore: bool = False
) -> np.ndarray:
    """Convert 4-class ES/MF labels to the 2-class side merge (and the ignore value K+1 along with it)."""
    if from_classes == to_classes:
        return labels.astype(np.uint8)
    if (from_classes, to_classes) != (4, 2):
        raise ValueError(f"cannot convert {from_classes}-class labels to {to_classes} classes")
    lut = np.array([0, 1, 1, 2, 2, 3 if ignore else 0] + [0] * 250, dtype=np.uint8)
    return lut[labels.astype(np.uint8)]


def fragment_fraction(labels: np.ndarray, n_classes: int) -> float:
    """Worst class's share of voxels outside its largest component (0 = one piece per class)."""
    worst = 0.0
    for c in range(1, n_classes + 1):
        mask = labels == c
        total = int(mask.sum())
        if total:
            worst = max(worst, 1.0 - int(largest_component(mask).sum()) / total)
    return worst
