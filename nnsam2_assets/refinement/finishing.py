"""How a model's prediction is finished on the scan's own image: the one finish that the final masks
apply and that each later stage's training labels get.

The models see a scan at 2 mm in-plane. Their raw masks are coarse, and on the slices no stage trained on
they grow the sides a little. A stage that learned the previous stage's raw predictions learned that
excess as label, and the sides grew stage by stage; the accuracy bench's per-stage rows show it on both
demo datasets. With the finished predictions as the next stage's labels, stage 3's own prediction gained
0.004-0.046 2-class Dice in all four cases of the bench (both TUM directions, demo Dixon and demo CT).
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from nnsam2_assets.core.intensities import registration_intensities
from nnsam2_assets.core.masks import clean_labels
from nnsam2_assets.propagation.boundary import band_pixels, refine_side_boundaries, row_aspect


def finish_refined(prediction: np.ndarray, image: sitk.Image, modality: str, k: int) -> np.ndarray:
    """A stage prediction as a mask: each class's largest component with its holes filled, then each side's
    edge re-placed on the scan's own image as the propagated masks' are (``propagation.boundary``: the walker
    works at the scan's resolution), cleaned again."""
    cleaned = clean_labels(prediction, k)
    intensities = registration_intensities(sitk.GetArrayViewFromImage(image), modality)
    band = band_pixels(image.GetSpacing()[0])
    aspect = row_aspect(image.GetSpacing())
    return clean_labels(refine_side_boundaries(cleaned, intensities, k, band, aspect=aspect), k)
