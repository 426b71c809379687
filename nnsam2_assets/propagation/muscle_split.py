"""The multifidus' share of each side, made to grow caudally as the anatomy does.

Why: registration carries the annotated slice's ES/MF interface to every level, so the multifidus keeps the
seed level's share of its side on every slice (measured on the TUM pair: 0.24-0.41 and 0.30-0.53 propagated,
against the experts' 0.5-0.8 at the inferior end and 0.1-0.15 at the superior end). Over the lumbar levels
the multifidus grows towards the sacrum while the erector spinae thins to its aponeurosis, so the share rises
caudally in every spine. This module shifts each slice's interface so that the share follows that rise from
the seed level, by a fixed slope on the logit scale. The side masks themselves (the 2-class result, volumes
per side) are untouched: only voxels inside a side change muscle.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from nnsam2_assets.core.labels import CLASSES_4

# logit of the multifidus' share per mm caudal of the seed level. Anatomy sets the sign and the order of
# magnitude (the share roughly doubles from L3 to L5); the two experts' slopes were 0.013-0.035 per mm, and
# the gain in 4-class Dice held over 0.01-0.02 in both directions (README, accuracy ablation). The low end
# is taken: a spine whose share rises less loses less to it than one whose rises more gains.
CAUDAL_SHARE_SLOPE_PER_MM = 0.015
_SHARE_LIMITS = (0.02, 0.98)  # a side slice all of one muscle still gets a finite logit


def _muscle_ids(side: str) -> tuple[int, int]:
    return CLASSES_4.index(f"{side}_mf") + 1, CLASSES_4.index(f"{side}_es") + 1


def caudal_mm_per_slice(image: sitk.Image) -> float:
    """Millimetres towards the feet per step of +1 in the array's first (z) index; negative when z runs
    towards the head, as on a canonical LPS array."""
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    return -float(direction[2, 2]) * float(image.GetSpacing()[2])


def split_slice(side: np.ndarray, multifidus: np.ndarray, share: float) -> np.ndarray:
    """The multifidus inside one side slice with the given share of it: the side's voxels ordered by their
    signed distance to the current multifidus (inside first), the first ``share`` of them taken, so the
    interface moves parallel to itself."""
    inside = ndimage.distance_transform_edt(multifidus)
    outside = ndimage.distance_transform_edt(~multifidus)
    signed = np.where(multifidus, -inside, outside)[side]
    keep = np.zeros(signed.size, dtype=bool)
    keep[np.argsort(signed, kind="stable")[: int(round(share * signed.size))]] = True
    out = np.zeros_like(side)
    out[tuple(index[keep] for index in np.nonzero(side))] = True
    return out


def apply_caudal_share(
    labels: np.ndarray, seed_slice: int, caudal_mm: float, slope_per_mm: float = CAUDAL_SHARE_SLOPE_PER_MM
) -> np.ndarray:
    """4-class labels [z, y, x] with each slice's multifidus share shifted by ``slope_per_mm`` on the logit
    scale per mm caudal of ``seed_slice`` (``caudal_mm`` per slice step, from ``caudal_mm_per_slice``).

    The seed slice and the side masks stay as they are; a side slice without multifidus is left alone (there
    is no interface to move)."""
    out = labels.copy()
    if slope_per_mm == 0:
        return out
    low, high = _SHARE_LIMITS
    for side_name in ("right", "left"):
        mf, es = _muscle_ids(side_name)
        for z in range(labels.shape[0]):
            shift = slope_per_mm * (z - seed_slice) * caudal_mm
            side = np.isin(labels[z], (mf, es))
            multifidus = labels[z] == mf
            if shift == 0 or not multifidus.any():
                continue
            share = float(np.clip(multifidus.sum() / side.sum(), low, high))
            target = 1.0 / (1.0 + np.exp(-(np.log(share / (1.0 - share)) + shift)))
            new_mf = split_slice(side, multifidus, target)
            out[z][side] = np.where(new_mf[side], mf, es)
    return out
