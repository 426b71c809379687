"""Pseudo-label selection (nnsam2 step 5): which slices of the propagated masks become training labels.

Slices are kept by confidence and plausibility; every slice not kept becomes nnU-Net's ``ignore`` label in
a full-size volume, never a shortened stack (the reference's shortened stacks lost slice positions).

Confidence falls with distance from the annotated slice, so a dataset-wide top-10 % cut keeps slices
bunched around the seed level. ``mode="banded"`` ranks within bands of relative slice level instead, so the
kept slices cover the whole region; ``mode="global"`` is nnsam2's rule (top fraction dataset-wide plus the
best slice of every level), kept for comparison.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from nnsam2_assets.core.labels import ignore_label


@dataclass(frozen=True)
class SelectionConfig:
    top_fraction: float = 0.10
    mode: str = "banded"  # "banded" | "global"
    n_bands: int = 5
    min_per_band: int = 1
    # every scan contributes at least this many eligible slices: in a small cohort the dataset-wide cut
    # can take every slice from one scan (TUM pair: 9 from TUM01, none from TUM02)
    min_per_scan: int = 3
    area_ratio: float = 1.5
    smooth_direction: str = "both"  # "both" | "superior" | "inferior"
    min_confidence: float = 0.0


def class_areas(masks: np.ndarray, n_classes: int) -> np.ndarray:
    """Pixel area per slice and class, shape [z, K]."""
    flat = masks.reshape(masks.shape[0], -1)
    return np.stack([(flat == c).sum(1) for c in range(1, n_classes + 1)], axis=1)


def area_smooth(areas: np.ndarray, ratio: float, direction: str = "both") -> np.ndarray:
    """Per slice: does its area change plausibly relative to its neighbour(s), for every class?

    ``areas`` is [z, K] on canonical slices (z increases superiorly). ``direction="superior"`` compares each
    slice with the next superior one and limits growth towards superior (the reference's rule, now with a
    defined anatomical direction); ``"inferior"`` mirrors it; ``"both"`` requires the ratio in either
    direction to stay within ``ratio`` for both neighbours. An empty slice next to a non-empty one fails.
    """
    areas = np.asarray(areas, dtype=float)
    if areas.ndim == 1:
        areas = areas[:, None]
    n = areas.shape[0]
    ok = np.ones(n, dtype=bool)
    eps = 1e-8

    def jump(a: np.ndarray, b: np.ndarray) -> np.ndarray:  # growth from a to b beyond the ratio, any class
        return ((b / (a + eps)) > ratio).any(axis=-1)

    for z in range(n):
        if direction in ("superior", "both") and z + 1 < n:
            ok[z] &= not jump(areas[z], areas[z + 1])
            if direction == "both":
                ok[z] &= not jump(areas[z + 1], areas[z])
        if direction in ("inferior", "both") and z > 0:
            ok[z] &= not jump(areas[z], areas[z - 1])
            if direction == "both":
                ok[z] &= not jump(areas[z - 1], areas[z])
    return ok


def slice_table(
    dataset: str, scan: str, masks: np.ndarray, confidence: pd.DataFrame, n_classes: int, cfg: SelectionConfig
) -> pd.DataFrame:
    """One row per slice of one scan: confidence (mean over classes), presence, relative level, smoothness."""
    n = masks.shape[0]
    conf = confidence.pivot_table(index="slice", columns="class_id", values="confidence", aggfunc="mean")
    present = confidence.pivot_table(index="slice", columns="class_id", values="present", aggfunc="all")
    conf = conf.reindex(index=range(n), columns=range(1, n_classes + 1)).fillna(0.0)
    present = present.reindex(index=range(n), columns=range(1, n_classes + 1)).fillna(False).astype(bool)
    areas = class_areas(masks, n_classes)
    rel = np.arange(n) / max(n - 1, 1)
    table = pd.DataFrame(
        {
            "dataset": dataset,
            "scan": scan,
            "slice": np.arange(n),
            "rel_level": rel,
            "band": np.minimum((rel * cfg.n_bands).astype(int), cfg.n_bands - 1),
            "confidence": conf.mean(axis=1).to_numpy(),
            "all_present": present.all(axis=1).to_numpy() & (areas > 0).all(axis=1),
            "smooth_ok": area_smooth(areas, cfg.area_ratio, cfg.smooth_direction),
            "area_px": areas.sum(axis=1),
        }
    )
    if "distance" in confidence.columns:
        dist = confidence.groupby("slice")["distance"].first().reindex(range(n))
        table["distance"] = dist.to_numpy()
    return table


def select_slices(table: pd.DataFrame, cfg: SelectionConfig) -> pd.DataFrame:
    """Mark kept slices across all scans of a dataset. Adds ``eligible`` and ``kept`` columns."""
    out = table.copy()
    out["eligible"] = out.all_present & out.smooth_ok & (out.confidence > cfg.min_confidence)
    out["kept"] = False
    eligible = out[out.eligible]
    if eligible.empty:
        return out
    keep_idx: set[int] = set()
    if cfg.mode == "global":
        cut = eligible.confidence.quantile(1.0 - cfg.top_fraction)
        keep_idx |= set(eligible.index[eligible.confidence >= cut])
        # nnsam2's "at least one per slice position": the best slice of every relative level
        level = (eligible.rel_level * (eligible.groupby("scan").slice.transform("max").max())).round()
        keep_idx |= set(eligible.groupby(level).confidence.idxmax())
    elif cfg.mode == "banded":
        for _, band in eligible.groupby("band"):
            k = max(cfg.min_per_band, math.ceil(cfg.top_fraction * len(out[out.band == band.band.iloc[0]])))
            keep_idx |= set(band.nlargest(k, "confidence").index)
    else:
        raise ValueError(f"unknown selection mode {cfg.mode!r}: use 'banded' or 'global'")
    keep_idx |= _scan_minimum(eligible, keep_idx, cfg.min_per_scan)
    out.loc[sorted(keep_idx), "kept"] = True
    return out


def _scan_minimum(eligible: pd.DataFrame, keep_idx: set[int], minimum: int) -> set[int]:
    """Top up scans with fewer than ``minimum`` kept slices: the best slice of each band first, so the
    extra slices spread over the region, then by confidence."""
    kept = eligible.index.isin(list(keep_idx))
    counts = pd.Series(kept, index=eligible.index).groupby(eligible.scan).sum()
    short = counts[counts < minimum]
    extra: set[int] = set()
    for scan, n_kept in short.items():  # usually none: a loop over scans only where a top-up is needed
        rest = eligible[(eligible.scan == scan) & ~kept]
        best_per_band = rest.loc[rest.groupby("band").confidence.idxmax()].sort_values("confidence")[::-1]
        order = list(best_per_band.index) + list(rest.sort_values("confidence", ascending=False).index)
        extra |= set(list(dict.fromkeys(order))[: minimum - int(n_kept)])
    return extra


def pseudo_label_volume(masks: np.ndarray, kept_slices: list[int] | np.ndarray, n_classes: int) -> np.ndarray:
    """Full-size label volume: kept slices carry the mask, every other voxel is the ignore label."""
    out = np.full(masks.shape, ignore_label(n_classes), dtype=np.uint8)
    kept = np.asarray(kept_slices, dtype=int)
    if kept.size:
        out[kept] = masks[kept]
    return out
