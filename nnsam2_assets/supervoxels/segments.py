"""Cutting one slice into segments: SLIC (weight-free) or SAM2's automatic masks, as one label map."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage
from skimage.segmentation import relabel_sequential, slic

if TYPE_CHECKING:  # the SAM2 path only: the weight-free one never imports torch or sam2
    from nnsam2_assets.supervoxels.automatic import CandidateMask

# both propagators label in 8 bits at most (SAM2 object ids, the registration chain's uint8 masks elsewhere)
MAX_SEGMENTS = 250
# SLIC's target segment area: about a square centimetre, several per muscle cross-section
SEGMENT_AREA_MM2 = 100.0
MIN_SEGMENTS = 8
# colour-space vs spatial weight of SLIC on intensities scaled to [0, 1]
SLIC_COMPACTNESS = 0.1
# the region cut around the propagated muscles of the seed slice
REGION_MARGIN_MM = 10.0
# a body mask for a slice without any mask yet: scaled intensities above this
BODY_THRESHOLD = 0.05


def region_around(
    mask: np.ndarray, spacing_yx: tuple[float, float], margin_mm: float = REGION_MARGIN_MM
) -> np.ndarray:
    """``mask`` grown by ``margin_mm`` in plane (anisotropic pixels allowed)."""
    radius = [max(1, int(round(margin_mm / s))) for s in spacing_yx]
    footprint = np.ones([2 * r + 1 for r in radius], bool)
    return ndimage.binary_dilation(mask, footprint)


def body_region(grey: np.ndarray) -> np.ndarray:
    """The largest bright component with its holes filled: the body on an axial slice."""
    labels, n = ndimage.label(grey > BODY_THRESHOLD)
    if n == 0:
        return np.ones(grey.shape, bool)
    largest = np.argmax(ndimage.sum_labels(np.ones_like(labels), labels, range(1, n + 1))) + 1
    return ndimage.binary_fill_holes(labels == largest)


def slic_segments(
    grey: np.ndarray, spacing_yx: tuple[float, float], within: np.ndarray | None = None
) -> np.ndarray:
    """SLIC segments of a [H, W] slice scaled to [0, 1], numbered 1..n (0 outside ``within``); n <= MAX_SEGMENTS."""
    region = body_region(grey) if within is None else within.astype(bool)
    if not region.any():
        return np.zeros(grey.shape, np.uint16)
    area_mm2 = float(region.sum()) * spacing_yx[0] * spacing_yx[1]
    n_segments = int(np.clip(round(area_mm2 / SEGMENT_AREA_MM2), MIN_SEGMENTS, MAX_SEGMENTS))
    labels = slic(np.asarray(grey, np.float64), n_segments=n_segments, compactness=SLIC_COMPACTNESS,
                  channel_axis=None, mask=region, spacing=np.asarray(spacing_yx, float), start_label=1,
                  enforce_connectivity=True)  # fmt: skip
    return _capped(labels)


def paint_candidates(
    candidates: Sequence[CandidateMask], shape: tuple[int, int], within: np.ndarray | None = None
) -> np.ndarray:
    """SAM2's candidate masks as one label map: larger ones first, so a smaller mask inside a larger one
    stays visible; numbered 1..n, clipped to ``within``."""
    labels = np.zeros(shape, np.int64)
    for k, candidate in enumerate(sorted(candidates, key=lambda c: -c.area), start=1):
        labels[candidate.mask] = k
    if within is not None:
        labels[~within.astype(bool)] = 0
    return _capped(labels)


def _capped(labels: np.ndarray) -> np.ndarray:
    labels, _, _ = relabel_sequential(np.asarray(labels, np.int64))
    if labels.max() > MAX_SEGMENTS:  # keep the largest segments
        sizes = np.bincount(labels.ravel())[1:]
        keep = np.argsort(-sizes)[:MAX_SEGMENTS] + 1
        labels = np.where(np.isin(labels, keep), labels, 0)
        labels, _, _ = relabel_sequential(labels)
    return labels.astype(np.uint16)
