"""In-plane muscle region of interest for CPU-sized nnU-Net training and prediction.

Why: the quick profile trains 2d patches of at most 96 x 96 pixels at 2 mm. On a full axial slice (TUM:
390 x 216 px at 1 mm) such a patch covers one side of the spine without the midline, and a translation-
equivariant network cannot tell right erector spinae from left there: on the TUM pair it predicted the
right-side class on both sides. Cropped to the muscles plus a margin, the whole region fits one patch, so
every prediction sees both sides and the spine between them.

The box comes from the scan's propagated mask (every scan has one before any nnU-Net stage sees it), in
the canonical grid; all slices are kept. Predictions are pasted back into the full canonical grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk


@dataclass(frozen=True)
class Roi:
    """An in-plane box, in ITK index order (x, y); the z extent is always the whole scan."""

    x0: int
    y0: int
    x1: int  # exclusive
    y1: int  # exclusive

    def crop(self, image: sitk.Image) -> sitk.Image:
        """The box as an image that keeps its physical position (origin moves, spacing/direction stay)."""
        size = [self.x1 - self.x0, self.y1 - self.y0, image.GetSize()[2]]
        return sitk.RegionOfInterest(image, size, [self.x0, self.y0, 0])

    def paste(self, cropped: np.ndarray, shape_zyx: tuple[int, int, int]) -> np.ndarray:
        """A [z, y, x] array of the cropped grid placed into zeros of the full grid."""
        out = np.zeros(shape_zyx, dtype=cropped.dtype)
        out[:, self.y0 : self.y1, self.x0 : self.x1] = cropped
        return out

    def key(self) -> str:
        return f"roi{self.x0}-{self.y0}-{self.x1}-{self.y1}"


def roi_from_mask(mask: sitk.Image, margin_mm: float) -> Roi | None:
    """Bounding box of all labelled voxels (any slice), grown by ``margin_mm`` and clipped to the image.

    None when the mask is empty: the caller then uses the whole slice rather than guessing a box.
    """
    arr = sitk.GetArrayFromImage(mask)
    footprint = arr.any(axis=0)
    if not footprint.any():
        return None
    ys, xs = np.nonzero(footprint)
    sx, sy = mask.GetSpacing()[:2]
    mx, my = math.ceil(margin_mm / sx), math.ceil(margin_mm / sy)
    return Roi(
        x0=max(0, int(xs.min()) - mx),
        y0=max(0, int(ys.min()) - my),
        x1=min(arr.shape[2], int(xs.max()) + 1 + mx),
        y1=min(arr.shape[1], int(ys.max()) + 1 + my),
    )
