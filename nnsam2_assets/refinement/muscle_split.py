"""The multifidus' share of each side in a 4-class final mask, made to grow caudally as the anatomy does.

Why: from one annotated slice, registration carries that level's ES/MF interface to every level, and the
models learn the interface from those pseudo-labels. Where the interface shows little contrast the
multifidus keeps the seed level's share of its side on every slice (TUM pair: 0.24-0.41 and 0.30-0.53
propagated, against the experts' 0.5-0.8 at the inferior end and 0.1-0.15 at the superior end; the final
masks' fitted slopes were -0.008..0.004 per mm). Over the lumbar levels the multifidus grows towards the
sacrum while the erector spinae thins to its aponeurosis, so the share rises caudally in every spine. This
module makes each side's share rise at least at a given slope on the logit scale: it fits the slope the mask
already has and adds only what is missing, so masks that followed a visible interface (the demo phantoms
draw a fascia: slopes 0.02-0.04 per mm) are left as they are. The side masks themselves (the 2-class
result, volumes and fat ratios per side) are untouched: only voxels inside a side change muscle.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from nnsam2_assets.core.labels import CLASSES_4

# the least rise of the logit of the multifidus' share per mm caudal. Anatomy sets the sign and the order of
# magnitude; the TUM experts' fitted slopes were 0.019-0.028 per mm (the demo phantoms' 0.028-0.045), and the
# gain in 4-class Dice held over 0.01-0.02 in both directions (`docs/accuracy.md`, ablation table). The low end is
# taken: a spine whose share rises less loses less to it than one whose share rises more gains.
CAUDAL_SHARE_SLOPE_PER_MM = 0.015
_MIN_FIT_SLICES = 3
_SHARE_LIMITS = (0.02, 0.98)  # a side slice all of one muscle still gets a finite logit


def _muscle_ids(side: str) -> tuple[int, int]:
    return CLASSES_4.index(f"{side}_mf") + 1, CLASSES_4.index(f"{side}_es") + 1


def caudal_mm_per_slice(image: sitk.Image) -> float:
    """Millimetres towards the feet per step of +1 in the array's first (z) index; negative when z runs
    towards the head, as on a canonical LPS array."""
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    return -float(direction[2, 2]) * float(image.GetSpacing()[2])


def ordered_split(side: np.ndarray, multifidus: np.ndarray, share: float) -> np.ndarray:
    """The multifidus inside a side with the given share of it: the side's voxels ordered by their signed
    distance to the interface (the multifidus' voxels by their distance to the erector spinae, the erector
    spinae's by theirs to the multifidus), the first ``share`` of them taken, so the interface moves parallel
    to itself whichever way it goes. Distances are taken over the whole array given."""
    erector = side & ~multifidus
    # to the erector spinae, not to anything outside the multifidus: a shrinking multifidus had given up its
    # rim on the background first (the lamina, the midline), wrapping erector spinae around it
    inside = ndimage.distance_transform_edt(~erector) if erector.any() else np.zeros(side.shape)
    outside = ndimage.distance_transform_edt(~multifidus)
    signed = np.where(multifidus, -inside, outside)[side]
    keep = np.zeros(signed.size, dtype=bool)
    keep[np.argsort(signed, kind="stable")[: int(round(share * signed.size))]] = True
    out = np.zeros_like(side)
    out[tuple(index[keep] for index in np.nonzero(side))] = True
    return out


def split_slice(side: np.ndarray, multifidus: np.ndarray, share: float) -> np.ndarray:
    """``ordered_split`` of one side slice, computed in the side's box plus one voxel of background: the
    multifidus lies in the side, so every voxel beyond the box is outside it and the split is the whole
    slice's, on a CT slice of 512 x 512 at a fraction of the cost."""
    (y0, y1), (x0, x1) = ((int(i.min()), int(i.max()) + 1) for i in np.nonzero(side))
    box = (slice(max(y0 - 1, 0), y1 + 1), slice(max(x0 - 1, 0), x1 + 1))
    out = np.zeros_like(side)
    out[box] = ordered_split(side[box], multifidus[box], share)
    return out


def _logit_shares(labels: np.ndarray, mf: int, es: int) -> dict[int, float]:
    """Per slice with multifidus on this side: the logit of its share of the side."""
    low, high = _SHARE_LIMITS
    out = {}
    for z in range(labels.shape[0]):
        n_mf = int((labels[z] == mf).sum())
        if n_mf:
            share = float(np.clip(n_mf / (n_mf + int((labels[z] == es).sum())), low, high))
            out[z] = float(np.log(share / (1.0 - share)))
    return out


def caudal_slope(labels: np.ndarray, side: str, caudal_mm: float) -> float:
    """The least-squares slope of the logit of the multifidus' share of ``side`` per mm caudal (0 with fewer
    than three slices to fit)."""
    logits = _logit_shares(labels, *_muscle_ids(side))
    if len(logits) < _MIN_FIT_SLICES:
        return 0.0
    caudal = np.array(list(logits)) * caudal_mm
    if np.ptp(caudal) == 0:
        return 0.0
    return float(np.polyfit(caudal, np.array(list(logits.values())), 1)[0])


def apply_caudal_share(
    labels: np.ndarray, seed_slice: int, caudal_mm: float, slope_per_mm: float = CAUDAL_SHARE_SLOPE_PER_MM
) -> np.ndarray:
    """4-class labels [z, y, x] whose multifidus share of each side rises caudally at ``slope_per_mm`` at
    least (logit per mm; ``caudal_mm`` per slice step, from ``caudal_mm_per_slice``): a side whose fitted
    slope falls short gets the difference, added per slice by mm caudal of ``seed_slice``.

    The seed slice and the side masks stay as they are; a side slice all of one muscle is left alone (there
    is no interface to move)."""
    out = labels.copy()
    if slope_per_mm <= 0:
        return out
    for side_name in ("right", "left"):
        missing = slope_per_mm - caudal_slope(labels, side_name, caudal_mm)
        if missing <= 0:
            continue
        mf, es = _muscle_ids(side_name)
        for z, logit in _logit_shares(labels, mf, es).items():
            shift = missing * (z - seed_slice) * caudal_mm
            side = np.isin(labels[z], (mf, es))
            # a slice all multifidus has a share of 1 that the fit's clipping made 0.98: moved from there, it
            # would gain erector spinae it never had
            if shift == 0 or not (labels[z] == es).any():
                continue
            new_mf = split_slice(side, labels[z] == mf, 1.0 / (1.0 + np.exp(-(logit + shift))))
            out[z][side] = np.where(new_mf[side], mf, es)
    return out
