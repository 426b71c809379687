"""Per-scan, per-label quantification of paraspinal muscle masks (docs/method.md, "Measurements"), free of Dagster.

Everything is measured in original units on the grid the caller passes (the pipeline passes each scan's
stored crop, LPS with slice 0 the most caudal slice of its region):
volumes in mL from the voxel spacing, CT attenuation in HU from the UNCLIPPED CT, Dixon fat ratio from the
raw water/fat intensities, and Dice against expert labels.

Inputs may be ``sitk.Image`` or numpy arrays. Arrays are compared by index, so all volumes passed to one
call must share the mask's array shape; for images the spacing is taken from the mask. Dixon water and fat
are paired by ARRAY index, never through physical space: the real MyoSegmenTUM water images carry an affine
without the true origin while the fat images carry it (identical voxel grids), so a physical-space
resample would wrongly empty or shift one of them. ``check_dixon_pair`` asserts shape and spacing instead.

Metric columns of :func:`quantify` (one row per (scan, label); a column not applicable is NaN so the schema
is fixed for the metrics database):

``scan, label, class_name, n_voxels, volume_ml, ct_mean_hu, ct_sd_hu, ct_median_hu, ct_mean_hu_muscle,
ct_n_voxels_muscle, fat_ratio, fat_fraction_mean, dice``

Per-slice columns of :func:`quantify_per_slice` (one row per (scan, label, slice)):

``scan, label, class_name, slice, n_voxels, area_mm2, ct_mean_hu, fat_ratio, dice``
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk

from nnsam2_assets.core.labels import dice

# Common skeletal-muscle attenuation window; reported as a separate column, never used to clip (§3).
MUSCLE_HU_RANGE: tuple[float, float] = (-29.0, 150.0)
# Dixon water/fat spacings differ in the 5th decimal in real exports (1.0185 vs 1.018519 mm).
SPACING_ATOL_MM = 1e-3

QUANT_COLUMNS = [
    "scan",
    "label",
    "class_name",
    "n_voxels",
    "volume_ml",
    "ct_mean_hu",
    "ct_sd_hu",
    "ct_median_hu",
    "ct_mean_hu_muscle",
    "ct_n_voxels_muscle",
    "fat_ratio",
    "fat_fraction_mean",
    "dice",
]
SLICE_COLUMNS = [
    "scan",
    "label",
    "class_name",
    "slice",
    "n_voxels",
    "area_mm2",
    "ct_mean_hu",
    "fat_ratio",
    "dice",
]

Volume = sitk.Image | np.ndarray


class QuantError(ValueError):
    """Inputs that cannot be quantified together (shape/spacing mismatch); the message names the files."""


# ---------------------------------------------------------------------------------------------- helpers
def _array(x: Volume, dtype: type | None = None) -> np.ndarray:
    arr = sitk.GetArrayFromImage(x) if isinstance(x, sitk.Image) else np.asarray(x)
    return arr.astype(dtype, copy=False) if dtype is not None else arr


def _spacing(mask: Volume, spacing: tuple[float, float, float] | None) -> tuple[float, float, float]:
    if isinstance(mask, sitk.Image):
        return tuple(float(s) for s in mask.GetSpacing())  # type: ignore[return-value]
    if spacing is None:
        raise QuantError("spacing (sx, sy, sz) in mm is required when the mask is a numpy array")
    return tuple(float(s) for s in spacing)  # type: ignore[return-value]


def _slice_axis(mask: Volume) -> int:
    """Numpy axis of the axial (S-I) direction: array [z,y,x] axis for the index axis closest to S-I."""
    if not isinstance(mask, sitk.Image):
        return 0  # arrays are assumed [z, y, x] with z axial (canonical convention)
    d = np.array(mask.GetDirection()).reshape(3, 3)
    index_axis = int(np.argmax(np.abs(d[2, :])))  # 0=i(x), 1=j(y), 2=k(z)
    return 2 - index_axis  # numpy order is reversed


def _check_same_shape(ref: np.ndarray, other: np.ndarray, what: str, names: str = "") -> None:
    if ref.shape != other.shape:
        raise QuantError(f"{what} array shape {other.shape} differs from the mask's {ref.shape}{names}")


def voxel_volume_ml(spacing: tuple[float, float, float]) -> float:
    """Voxel volume in mL from a spacing in mm (sx·sy·sz / 1000)."""
    sx, sy, sz = spacing
    return float(sx) * float(sy) * float(sz) / 1000.0


# ---------------------------------------------------------------------------------------------- metrics
def ct_stats(ct: np.ndarray, region: np.ndarray, hu_range: tuple[float, float] = MUSCLE_HU_RANGE) -> dict:
    """Mean/SD(ddof=1)/median HU of the UNCLIPPED CT in a boolean region, plus the mean restricted to
    ``hu_range`` (inclusive) and its voxel count. Empty region -> NaN."""
    vals = np.asarray(ct)[region].astype(np.float64)
    in_range = vals[(vals >= hu_range[0]) & (vals <= hu_range[1])]
    return {
        "ct_mean_hu": float(vals.mean()) if vals.size else np.nan,
        "ct_sd_hu": float(vals.std(ddof=1)) if vals.size > 1 else np.nan,
        "ct_median_hu": float(np.median(vals)) if vals.size else np.nan,
        "ct_mean_hu_muscle": float(in_range.mean()) if in_range.size else np.nan,
        "ct_n_voxels_muscle": int(in_range.size),
    }


def fat_ratio_of_sums(fat_sum: np.ndarray | float, water_sum: np.ndarray | float) -> np.ndarray:
    """Dixon fat ratio Σfat / (Σfat + Σwater) from region sums (scalars or per-slice arrays); NaN where the
    denominator is 0. This is THE fat ratio of the pipeline (the reference's and the MANIFEST's definition)."""
    f = np.asarray(fat_sum, dtype=np.float64)
    denom = f + np.asarray(water_sum, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom != 0, f / np.where(denom != 0, denom, 1.0), np.nan)


def fat_ratio(fat: np.ndarray, water: np.ndarray, region: np.ndarray) -> float:
    """Dixon fat ratio over a boolean region: Σfat / (Σfat + Σwater) of the raw intensities."""
    f = np.asarray(fat)[region].astype(np.float64)
    w = np.asarray(water)[region].astype(np.float64)
    return float(fat_ratio_of_sums(f.sum(), w.sum()))


def fat_fraction_mean(fat: np.ndarray, water: np.ndarray, region: np.ndarray) -> float:
    """Mean of the voxel-wise F/(F+W) over a region, skipping voxels with F+W == 0.

    Not the fat ratio: the two differ noticeably (TUM01 label 1: ratio 0.1457, mean fraction 0.1321), hence
    two named columns.
    """
    f = np.asarray(fat)[region].astype(np.float64)
    denom = f + np.asarray(water)[region].astype(np.float64)
    ok = denom != 0
    return float(np.mean(f[ok] / denom[ok])) if ok.any() else np.nan


# ---------------------------------------------------------------------------------------------- Dixon
def check_dixon_pair(
    water: Volume,
    fat: Volume,
    water_name: str | Path = "<water>",
    fat_name: str | Path = "<fat>",
    atol_mm: float = SPACING_ATOL_MM,
) -> None:
    """Assert that a water/fat pair can be paired by array index: same shape and (for images) same spacing.

    Origins are deliberately NOT compared: the real water affine lacks its origin (see module docstring).
    Raises :class:`QuantError` naming both files.
    """
    ws, fs = _array(water).shape, _array(fat).shape
    if ws != fs:
        raise QuantError(f"Dixon fat {fat_name} shape {fs} differs from water {water_name} shape {ws}")
    if isinstance(water, sitk.Image) and isinstance(fat, sitk.Image):
        wsp, fsp = np.array(water.GetSpacing()), np.array(fat.GetSpacing())
        if not np.allclose(wsp, fsp, atol=atol_mm):
            raise QuantError(
                f"Dixon fat {fat_name} spacing {tuple(np.round(fsp, 4))} differs from water {water_name} "
                f"spacing {tuple(np.round(wsp, 4))}; water/fat are paired by array index and must share a grid"
            )


# ---------------------------------------------------------------------------------------------- tables
def _prepare(
    mask: Volume,
    spacing: tuple[float, float, float] | None,
    ct: Volume | None,
    water: Volume | None,
    fat: Volume | None,
    expert: Volume | None,
    names: Mapping[str, str] | None,
) -> tuple[np.ndarray, tuple[float, float, float], dict[str, np.ndarray | None]]:
    names = dict(names or {})
    m = _array(mask)
    sp = _spacing(mask, spacing)
    if (water is None) != (fat is None):
        raise QuantError("Dixon fat ratio needs both water and fat (got only one)")
    if water is not None and fat is not None:
        check_dixon_pair(water, fat, names.get("water", "<water>"), names.get("fat", "<fat>"))
    arrays: dict[str, np.ndarray | None] = {}
    for key, vol in (("ct", ct), ("water", water), ("fat", fat), ("expert", expert)):
        if vol is None:
            arrays[key] = None
            continue
        arr = _array(vol)
        label = f" ({names[key]} vs mask {names.get('mask', '<mask>')})" if key in names else ""
        _check_same_shape(m, arr, key, label)
        arrays[key] = arr
    return m, sp, arrays


def quantify(
    mask: Volume,
    class_names: Mapping[int, str],
    scan: str = "",
    *,
    ct: Volume | None = None,
    water: Volume | None = None,
    fat: Volume | None = None,
    expert: Volume | None = None,
    spacing: tuple[float, float, float] | None = None,
    hu_range: tuple[float, float] = MUSCLE_HU_RANGE,
    names: Mapping[str, str] | None = None,
) -> pd.DataFrame:
    """Tidy metrics, one row per (scan, label) in ``class_names`` (columns: ``QUANT_COLUMNS``).

    ``mask``: label volume (ids = keys of ``class_names``) on the same array grid as ``ct``/``water``/
    ``fat``/``expert``. Spacing comes from the mask image (or ``spacing`` for arrays). CT metrics need
    ``ct`` (HU, unclipped); fat metrics need ``water`` and ``fat``; ``dice`` needs ``expert``. Missing
    inputs leave their columns NaN. ``names`` optionally maps "mask"/"ct"/"water"/"fat"/"expert" to file
    names for error messages.
    """
    m, sp, a = _prepare(mask, spacing, ct, water, fat, expert, names)
    vox_ml = voxel_volume_ml(sp)
    rows = []
    for label, cname in sorted(class_names.items()):
        region = m == label
        n = int(np.count_nonzero(region))
        row: dict = dict.fromkeys(QUANT_COLUMNS, np.nan)
        row.update(scan=scan, label=int(label), class_name=str(cname), n_voxels=n, volume_ml=n * vox_ml)
        if a["ct"] is not None:
            row.update(ct_stats(a["ct"], region, hu_range))
        if a["fat"] is not None:
            row["fat_ratio"] = fat_ratio(a["fat"], a["water"], region)
            row["fat_fraction_mean"] = fat_fraction_mean(a["fat"], a["water"], region)
        if a["expert"] is not None:
            row["dice"] = dice(region, a["expert"] == label)
        rows.append(row)
    df = pd.DataFrame(rows, columns=QUANT_COLUMNS)
    return df.astype({"label": "int64", "n_voxels": "int64"})


def quantify_per_slice(
    mask: Volume,
    class_names: Mapping[int, str],
    scan: str = "",
    *,
    ct: Volume | None = None,
    water: Volume | None = None,
    fat: Volume | None = None,
    expert: Volume | None = None,
    spacing: tuple[float, float, float] | None = None,
    names: Mapping[str, str] | None = None,
) -> pd.DataFrame:
    """Per-slice metrics, one row per (scan, label, axial slice), every slice included (columns:
    ``SLICE_COLUMNS``).

    ``slice`` is the index along the mask's axial axis (for images the index axis closest to S-I; for
    arrays axis 0): on the pipeline's stored crop, counted from the region's most caudal slice. ``area_mm2`` is the
    cross-sectional area (voxel count × in-plane pixel area). Empty slices have area 0, NaN CT/fat ratio
    and Dice 1.0 when the expert slice is also empty.
    """
    m, sp, a = _prepare(mask, spacing, ct, water, fat, expert, names)
    axis = _slice_axis(mask)
    # numpy axis -> sitk spacing index is reversed; in-plane area = product of the other two spacings
    sitk_axis = 2 - axis
    pixel_mm2 = float(np.prod([s for i, s in enumerate(sp) if i != sitk_axis]))
    n_slices = m.shape[axis]
    other = tuple(i for i in range(3) if i != axis)

    def per_slice_sum(x: np.ndarray) -> np.ndarray:
        return x.sum(axis=other, dtype=np.float64)

    rows = []
    for label, cname in sorted(class_names.items()):
        region = m == label
        counts = region.sum(axis=other).astype(np.int64)
        cols: dict[str, np.ndarray] = {}
        with np.errstate(invalid="ignore", divide="ignore"):
            if a["ct"] is not None:
                cols["ct_mean_hu"] = per_slice_sum(np.where(region, a["ct"], 0).astype(np.float64)) / counts
            if a["fat"] is not None:
                sf = per_slice_sum(np.where(region, a["fat"], 0).astype(np.float64))
                sw = per_slice_sum(np.where(region, a["water"], 0).astype(np.float64))
                cols["fat_ratio"] = fat_ratio_of_sums(sf, sw)
            if a["expert"] is not None:
                ref = a["expert"] == label
                cols["dice"] = np.array(
                    [dice(np.take(region, z, axis), np.take(ref, z, axis)) for z in range(n_slices)]
                )
        rows.append(
            pd.DataFrame(
                {
                    "scan": scan,
                    "label": int(label),
                    "class_name": str(cname),
                    "slice": np.arange(n_slices, dtype=np.int64),
                    "n_voxels": counts,
                    "area_mm2": counts * pixel_mm2,
                    **{
                        c: cols.get(c, np.full(n_slices, np.nan)) for c in ("ct_mean_hu", "fat_ratio", "dice")
                    },
                }
            )
        )
    if not rows:
        return pd.DataFrame(columns=SLICE_COLUMNS)
    return pd.concat(rows, ignore_index=True)[SLICE_COLUMNS]


# The region's two level segments, from the top down, when the reference names the L4/L5 disc. On the
# canonical crop (z up, slice 0 = L5/S1) the L4/L5 disc's own slice belongs to the UPPER segment: each segment
# runs from its lower disc up to, not including, its upper disc, and the top segment also keeps L3/L4.
LEVEL_SEGMENTS = ("L3/L4-L4/L5", "L4/L5-L5/S1")
LEVEL_COLUMNS = [
    "scan",
    "level",
    "label",
    "class_name",
    "first_slice",
    "last_slice",
    "n_slices",
    "n_voxels",
    "volume_ml",
    "mean_csa_mm2",
    "ct_mean_hu",
    "fat_ratio",
    "dice",
]


def level_slices(n_slices: int, l4_l5_slice: int) -> dict[str, range]:
    """Canonical slice ranges of the level segments (see LEVEL_SEGMENTS for where the L4/L5 slice goes)."""
    if not 0 < l4_l5_slice < n_slices - 1:
        raise ValueError(
            f"the L4/L5 slice {l4_l5_slice} must lie strictly inside the region's {n_slices} slices"
        )
    return {LEVEL_SEGMENTS[0]: range(l4_l5_slice, n_slices), LEVEL_SEGMENTS[1]: range(0, l4_l5_slice)}


def quantify_levels(
    mask: Volume,
    class_names: Mapping[int, str],
    l4_l5_slice: int,
    scan: str = "",
    *,
    ct: Volume | None = None,
    water: Volume | None = None,
    fat: Volume | None = None,
    expert: Volume | None = None,
    spacing: tuple[float, float, float] | None = None,
) -> pd.DataFrame:
    """Per level segment and label (columns ``LEVEL_COLUMNS``): the segment's volume, mean cross-sectional
    area over its slices, HU and fat ratio, from :func:`quantify` on the segment's slices of a canonical
    [z, y, x] region crop. The segments partition the region, so their volumes add up to its volume."""
    m, sp, a = _prepare(mask, spacing, ct, water, fat, expert, None)
    pixel_mm2 = float(sp[0] * sp[1])
    frames = []
    for level, zs in level_slices(m.shape[0], l4_l5_slice).items():
        part = slice(zs.start, zs.stop)
        inputs = {key: None if value is None else value[part] for key, value in a.items()}
        rows = quantify(m[part], class_names, scan, spacing=sp, **inputs)
        rows = rows.assign(
            level=level,
            first_slice=zs.start,
            last_slice=zs.stop - 1,
            n_slices=len(zs),
            mean_csa_mm2=rows.n_voxels * pixel_mm2 / len(zs),
        )
        frames.append(rows)
    return pd.concat(frames, ignore_index=True)[LEVEL_COLUMNS]
