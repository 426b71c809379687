"""Mask clean-up: the largest 3-D component per class, holes filled, and how fragmented a mask is."""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def largest_component(mask: np.ndarray) -> np.ndarray:
    """Largest face-connected component of a binary mask, 2-D or 3-D (ties: the first in raster order)."""
    lab, n = ndimage.label(mask)
    if n <= 1:
        return mask.astype(bool)
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    return lab == int(np.argmax(sizes))


def clean_labels(labels: np.ndarray, n_classes: int, fill_holes: bool = True) -> np.ndarray:
    """Keep the largest component of each class and fill its holes slice by slice (never across classes)."""
    out = np.zeros_like(labels, dtype=np.uint8)
    for c in range(1, n_classes + 1):
        comp = largest_component(labels == c)
        if fill_holes and comp.any():
            comp = np.stack([ndimage.binary_fill_holes(s) for s in comp])
        out[comp & (out == 0)] = c
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
