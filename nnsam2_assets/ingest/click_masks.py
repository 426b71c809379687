"""A slice mask from click prompts, without weights: scikit-image's random walker on the reference slice.

Seeds: a small disc of each class around its positive points; background discs around the negative points;
and a background ring, every pixel farther than ``ring_mm`` from all positive points (the muscles of one side
are a few centimetres across, so a click inside a muscle is never farther than that from its edge). The
walker places each class's edge along the image's own edges between the seeds. The registration backend then
propagates this mask as it would a drawn one.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from nnsam2_assets.core.intensities import registration_intensities
from nnsam2_assets.core.masks import clean_labels
from nnsam2_assets.core.walker import walk
from nnsam2_assets.ingest.clicks import SliceClicks

SEED_RADIUS_MM = 2.0
RING_MM = 25.0
BETA = 500.0  # edge weight; sharper than scikit-image's default (130), muscle against fat is a strong edge


def mask_from_clicks(
    volume: np.ndarray,
    clicks: SliceClicks,
    n_classes: int,
    modality: str,
    spacing_xy: tuple[float, float],
    ring_mm: float = RING_MM,
) -> np.ndarray:
    """The clicked slice's labels (uint8, classes 1..n_classes) from a canonical ``volume`` [z, y, x]."""
    image = registration_intensities(volume, modality)[clicks.slice]
    sx, sy = spacing_xy
    positive = np.zeros(image.shape, bool)
    for r, c, p in zip(clicks.rows, clicks.cols, clicks.positive, strict=True):
        positive[r, c] |= p
    far = ndimage.distance_transform_edt(~positive, sampling=(sy, sx)) > ring_mm
    seeds = np.where(far, 1, 0).astype(np.int32)
    yy, xx = np.mgrid[0 : image.shape[0], 0 : image.shape[1]]
    for r, c, k, p in zip(clicks.rows, clicks.cols, clicks.class_ids, clicks.positive, strict=True):
        disc = ((yy - r) * sy) ** 2 + ((xx - c) * sx) ** 2 <= SEED_RADIUS_MM**2
        seeds[disc] = k + 1 if p else 1
    walked = walk(image, seeds, BETA, within=~far, spacing=(sy / sx, 1.0))  # steps per mm; square as before
    labels = np.where(walked > 1, walked - 1, 0).astype(np.uint8)
    return clean_labels(labels[None], n_classes)[0]
