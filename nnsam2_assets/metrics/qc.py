"""QC flags: which scans need a human look, and why.

Severity ``WARN`` marks review items (the numbers may be right but look unusual); ``ERROR`` marks broken
outputs (an empty mask, a missing class). Flags are rows (dataset, scan, flag, severity, detail) so they can
be queried in DuckDB and shown as asset-check metadata.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

# A mask this good needs no review: the calibrated flags stay quiet above it.
GOOD_DICE = 0.85
# ``low_confidence`` thresholds per propagation backend, because the confidences live on different scales:
# SAM2's is its predicted IoU; the registration backend's is NCC damped by the distance to the seed, about
# 0.35 on good TUM masks. The registration threshold is fitted by ``bench/quality_calibration.py`` (it
# prints the fit, its leave-one-out error and the cases); SAM2's cannot be fitted without a checkpoint.
MIN_CONFIDENCE = {"sam2": 0.5, "registration": 0.156}


def confidence_threshold(backend: str, thresholds: Mapping[str, float] = MIN_CONFIDENCE) -> float:
    """The mean propagation confidence below which a scan's propagation wants review, on its backend's scale
    (an unknown backend is held to SAM2's)."""
    return float(thresholds.get(backend, thresholds.get("sam2", MIN_CONFIDENCE["sam2"])))


def mean_confidence(confidence: pd.DataFrame) -> float:
    """A scan's propagation confidence: the mean over slices of the per-slice mean over classes."""
    return float(confidence.groupby("slice").confidence.mean().mean())


@dataclass(frozen=True)
class QCConfig:
    min_confidence: Mapping[str, float] = field(default_factory=lambda: dict(MIN_CONFIDENCE))
    min_stage_dice: float = 0.85
    max_asymmetry: float = 1.5  # larger side volume / smaller side volume
    # |right - left| Dixon fat ratio; unilateral fatty infiltration of the multifidus tracks unilateral
    # pathology (radiculopathy, post-surgical denervation), healthy sides differ by a few points at most
    max_fat_asymmetry: float = 0.05
    robust_z: float = 3.5
    max_fragment_fraction: float = 0.10
    hu_range: tuple[float, float] = (-50.0, 100.0)


WARN, ERROR = "WARN", "ERROR"


def robust_z(values: pd.Series) -> pd.Series:
    """Modified z-score (Iglewicz-Hoaglin): 0.6745 (x - median) / MAD; 0 where the MAD is 0."""
    med = values.median()
    mad = (values - med).abs().median()
    if not np.isfinite(mad) or mad == 0:
        return pd.Series(0.0, index=values.index)
    return 0.6745 * (values - med) / mad


def _side_fat_ratio(group: pd.DataFrame) -> pd.Series:
    """Per side, the volume-weighted mean of its labels' fat ratios (exact for 2-class rows; for 4-class
    rows it weights by volume instead of by fat+water signal, a close approximation)."""
    if "fat_ratio" not in group:
        return pd.Series(dtype=float)
    rows = group.dropna(subset=["fat_ratio"])
    rows = rows[rows.volume_ml > 0]
    if rows.empty:
        return pd.Series(dtype=float)
    weighted = (rows.fat_ratio * rows.volume_ml).groupby(rows.side).sum()
    return weighted / rows.volume_ml.groupby(rows.side).sum()


QC_FLAG_COLUMNS = ("dataset", "scan", "flag", "severity", "detail")


def qc_flags(scans: pd.DataFrame, labels: pd.DataFrame, cfg: QCConfig = QCConfig()) -> pd.DataFrame:
    """Flags from per-scan rows and per-scan x label rows.

    ``scans`` columns: dataset, scan, mean_confidence, stage_dice_min, fragment_fraction, and optionally
    backend (the propagation backend, for its confidence threshold) and laterality_gap (``core.masks.laterality_gap_voxels`` of the final mask).
    ``labels`` columns: dataset, scan, label, side ('right'/'left'), volume_ml, and optionally fat_ratio, hu_mean.
    """
    flags: list[dict] = []

    def add(row, flag: str, severity: str, detail: str) -> None:
        flags.append(
            {"dataset": row.dataset, "scan": row.scan, "flag": flag, "severity": severity, "detail": detail}
        )

    for row in scans.itertuples():
        backend = getattr(row, "backend", "sam2")
        threshold = confidence_threshold(backend, cfg.min_confidence)
        if pd.notna(row.mean_confidence) and row.mean_confidence < threshold:
            add(
                row,
                "low_confidence",
                WARN,
                f"mean propagation confidence {row.mean_confidence:.2f} < {threshold} ({backend} backend)",
            )
        if pd.notna(row.stage_dice_min) and row.stage_dice_min < cfg.min_stage_dice:
            add(
                row,
                "stage_disagreement",
                WARN,
                f"lowest stage-to-stage Dice {row.stage_dice_min:.3f} < {cfg.min_stage_dice}",
            )
        gap = getattr(row, "laterality_gap", np.nan)
        if pd.notna(gap) and gap < 0:
            add(
                row,
                "laterality_swapped",
                ERROR,
                f"the right-side labels lie {-gap:.0f} voxels to the patient's left of the left-side labels",
            )
        if pd.notna(row.fragment_fraction) and row.fragment_fraction > cfg.max_fragment_fraction:
            add(
                row,
                "fragmented_mask",
                WARN,
                f"{row.fragment_fraction:.0%} of the stage-3 mask outside its largest component",
            )

    for _key, group in labels.groupby(["dataset", "scan"]):
        empty = group[group.volume_ml <= 0]
        for row in empty.itertuples():
            add(row, "empty_mask", ERROR, f"label {row.label} has no voxels")
        sides = group.groupby("side").volume_ml.sum()
        if {"right", "left"} <= set(sides.index) and min(sides) > 0:
            ratio = max(sides) / min(sides)
            if ratio > cfg.max_asymmetry:
                larger, smaller = ("right", "left") if sides["right"] > sides["left"] else ("left", "right")
                add(
                    group.iloc[0],
                    "asymmetry",
                    WARN,
                    f"the {larger} side is {ratio:.2f} times the {smaller} side's volume (right "
                    f"{sides['right']:.1f} ml, left {sides['left']:.1f} ml; > {cfg.max_asymmetry})",
                )
        side_fat = _side_fat_ratio(group)
        if {"right", "left"} <= set(side_fat.index):
            gap = abs(side_fat["right"] - side_fat["left"])
            if gap > cfg.max_fat_asymmetry:
                add(
                    group.iloc[0],
                    "fat_asymmetry",
                    WARN,
                    f"fat ratio right {side_fat['right']:.3f} vs left {side_fat['left']:.3f} "
                    f"(|difference| {gap:.3f} > {cfg.max_fat_asymmetry})",
                )
        if "hu_mean" in group:
            for row in group.dropna(subset=["hu_mean"]).itertuples():
                lo, hi = cfg.hu_range
                if not lo <= row.hu_mean <= hi:
                    add(
                        row,
                        "implausible_hu",
                        WARN,
                        f"label {row.label} mean {row.hu_mean:.1f} HU outside {lo:g}..{hi:g}",
                    )

    for measure in ("volume_ml", "fat_ratio"):
        if measure not in labels or labels[measure].isna().all():
            continue
        for (_, _label), group in labels.groupby(["dataset", "label"]):
            if len(group) < 5:  # too few scans for a robust spread
                continue
            z = robust_z(group[measure].astype(float))
            for row, zv in zip(group.itertuples(), z, strict=True):
                if abs(zv) > cfg.robust_z:
                    add(
                        row,
                        f"{measure}_outlier",
                        WARN,
                        f"label {row.label} {measure} {getattr(row, measure):.3g} (robust z {zv:.1f})",
                    )
    return pd.DataFrame(flags, columns=list(QC_FLAG_COLUMNS))
