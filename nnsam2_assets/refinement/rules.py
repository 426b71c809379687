"""Which predictions of one nnU-Net stage train the next (nnsam2 step 7): the agreement filters and the
per-stage rules."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from nnsam2_assets.core.labels import mean_dice
from nnsam2_assets.pseudolabels.selection import area_smooth, class_areas


def volume_smooth(masks: np.ndarray, n_classes: int, ratio: float, direction: str = "both") -> bool:
    """Whole-volume smoothness: every non-empty slice run changes area within ``ratio``."""
    areas = class_areas(masks, n_classes).astype(float)
    nonempty = (areas > 0).all(axis=1)
    if not nonempty.any():
        return False
    z = np.flatnonzero(nonempty)
    inner = areas[z.min() : z.max() + 1]  # the empty caps outside the muscles' extent are not a jump
    return bool(area_smooth(inner, ratio, direction).all())


@dataclass(frozen=True)
class StageRule:
    """Which predictions of the previous stage train the next one (nnsam2 step 7)."""

    min_mean_dice: float
    area_ratio: float
    top_fraction: float | None = None  # per dataset, after filtering (stage 3: 0.2)
    min_per_dataset: int = 2
    min_slice_dice: float = 0.85  # within selected scans, slices below this agreement are "ignore"


STAGE_RULES = {
    "stage2": StageRule(min_mean_dice=0.90, area_ratio=1.5),
    "stage3": StageRule(min_mean_dice=0.95, area_ratio=1.25, top_fraction=0.20),
}


def select_stage_cases(agreement: pd.DataFrame, rule: StageRule) -> pd.DataFrame:
    """Pick training cases from per-scan agreement rows (columns dataset, scan, mean_dice, smooth_ok).

    When fewer than ``min_per_dataset`` pass, the best by agreement are taken instead and ``relaxed`` is set:
    a stage never silently trains on nothing (on CPU, registration pseudo-labels at ~0.85-0.90 Dice can make
    a fixed 0.90/0.95 threshold select no scan at all).
    """
    out = agreement.copy()
    out["passes"] = (out.mean_dice > rule.min_mean_dice) & out.smooth_ok
    out["selected"] = False
    out["relaxed"] = False
    for _, group in out.groupby("dataset"):
        passing = group[group.passes].sort_values("mean_dice", ascending=False)
        n_target = len(passing)
        if rule.top_fraction is not None:
            n_target = max(rule.min_per_dataset, int(rule.top_fraction * len(group)))
            n_target = min(n_target, len(passing)) if len(passing) >= rule.min_per_dataset else n_target
        if len(passing) >= rule.min_per_dataset:
            chosen = passing.head(max(n_target, rule.min_per_dataset))
        else:
            chosen = group.sort_values(["passes", "mean_dice"], ascending=False).head(
                min(rule.min_per_dataset, len(group))
            )
            out.loc[group.index, "relaxed"] = True
        out.loc[chosen.index, "selected"] = True
    return out


def slice_agreement(
    pred: np.ndarray, ref: np.ndarray, n_classes: int, min_dice: float
) -> tuple[np.ndarray, bool]:
    """Per slice: do two label volumes agree (mean class Dice >= min_dice, both non-empty)? And was that relaxed?

    If no slice reaches ``min_dice`` the better-agreeing half of the non-empty slices is kept instead (relaxed),
    so a selected scan never contributes an all-ignore label (the stage's WARN check records relaxed datasets).
    """
    scores = np.full(pred.shape[0], -1.0)
    for z in range(pred.shape[0]):
        if pred[z].any() and ref[z].any():
            scores[z] = mean_dice(pred[z], ref[z], n_classes)
    kept = scores >= min_dice
    if kept.any() or not (scores >= 0).any():
        return kept, False
    return scores >= np.median(scores[scores >= 0]), True
