"""Finding a scan's L3/L4 to L5/S1 region from the one the user marked on the reference scan.

The user marks the region's disc slices once, on the reference (``dataset.yaml`` ``region``). For every other
scan the same planes are found by matching the reference onto the scan on a coarse 4 x 4 x 2 mm grid
(SimpleITK resampling, then an exhaustive search of the correlation of intensity ranks, so CT and MRI
need no window and no optimiser can stop in a local optimum):

1. **Global.** The reference's region plus a margin is slid along z over the whole scan (the in-plane offset
   from the body centroids); the best few distinct z positions are refined in plane and the best refined
   one is the alignment. A lumbar spine repeats itself vertebra by vertebra, so the best alignment at least
   ``SEPARATION_MM`` away says how unique the match is: ``confidence`` is the share of the best alignment's
   remaining dissimilarity that this runner-up leaves, (match - runner_up) / (1 - runner_up).
2. **Per disc.** A thin slab around each marked disc is searched within ``MAX_DISC_SHIFT_MM`` of the global
   alignment (less than half a vertebra, so it settles on the nearest disc). Subjects differ in spine
   length, so one translation misplaces the far disc by a slice or two; this step removes that.

Each disc plane is carried as the physical point at the centre of its reference slice and read back as
the scan's nearest axial slice, so the two files may differ in orientation, spacing and origin. Dagster-free.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from nnsam2_assets.core.imaging import axial_axis, to_canonical
from nnsam2_assets.ingest.regions import Region

VERSION = "region-finding-v1"
GRID_MM = (4.0, 4.0, 2.0)
MARGIN_MM = 40.0  # reference content beyond the region that the global match uses
MIN_OVERLAP = 0.6  # share of the reference slab that must lie inside the scan for a z position to count
CANDIDATES = 3  # distinct z shifts of the exhaustive search that are refined in plane
SEPARATION_MM = 10.0  # alignments closer than this are the same alignment
DISC_HALF_HEIGHT_MM = 10.0  # slab around each disc for the per-disc step (a vertebra is 25-40 mm high)
MAX_DISC_SHIFT_MM = 10.0
# vertebrae are about equally high, so the found region's length and where L4/L5 falls in it are bounded
MIN_LENGTH_RATIO = 0.8
MAX_L4_L5_SHARE_CHANGE = 0.12
# below this the found region is reported as uncertain (a WARN check); measured by bench/region_bench.py
MIN_CONFIDENCE = 0.15


@dataclass(frozen=True)
class FoundRegion:
    region: Region  # slice indices in the scan file's own axial order
    confidence: float  # 0: another alignment fits as well, 1: unique
    off_scan: bool  # a disc mapped beyond the scan's slices (clamped to its first or last slice)
    detail: str
    odd_geometry: bool = False  # the found discs' spacing does not fit the reference's

    @property
    def uncertain(self) -> bool:
        return self.off_scan or self.odd_geometry or self.confidence < MIN_CONFIDENCE


def find_region(reference: sitk.Image, reference_region: Region, scan: sitk.Image) -> FoundRegion:
    """The reference's region discs located on ``scan`` (both as read from their files, any orientation)."""
    ref, tgt = _coarse(reference), _coarse(scan)
    planes = {name: plane_point(reference, index) for name, index in _discs(reference_region).items()}
    z_lo, z_hi = min(p[2] for p in planes.values()), max(p[2] for p in planes.values())
    fit = _global_alignment(_z_slab(ref, z_lo - MARGIN_MM, z_hi + MARGIN_MM), tgt)
    # the discs are searched on the z derivative: a disc and its end plates are where the image changes
    # fastest along z, while the body around them changes slowly from level to level
    ref_dz, tgt_dz = sitk.Derivative(ref, direction=2), sitk.Derivative(tgt, direction=2)
    offsets = {}
    for name, point in planes.items():
        disc_slab = _z_slab(ref_dz, point[2] - DISC_HALF_HEIGHT_MM, point[2] + DISC_HALF_HEIGHT_MM)
        z = point[2] + fit.offset[2]
        inside = tgt.GetOrigin()[2] + DISC_HALF_HEIGHT_MM <= z <= _z_top(tgt) - DISC_HALF_HEIGHT_MM
        # a disc the alignment puts off the scan stays there: a search would pull it onto an inner disc
        offsets[name] = _disc_offset(disc_slab, tgt_dz, fit.offset) if inside else fit.offset
    n = scan.GetSize()[axial_axis(scan)]
    found: dict[str, int] = {}
    off_scan = []
    for name, point in planes.items():
        index = _axial_index(scan, point + offsets[name])
        if not 0 <= index <= n - 1:
            off_scan.append(f"{name} disc at slice {index}")
        found[name] = int(np.clip(index, 0, n - 1))
    lo, hi = sorted((found["first"], found["last"]))
    l4_l5 = found.get("l4_l5")
    detail = (
        f"shift {', '.join(f'{v:+.1f}' for v in fit.offset)} mm, match {fit.ncc:.3f}, runner-up "
        f"{fit.runner_up:.3f}; per-disc z corrections "
        + ", ".join(f"{name} {offsets[name][2] - fit.offset[2]:+.1f} mm" for name in planes)
    )
    if l4_l5 is not None and not lo < l4_l5 < hi:
        # on thick slices the disc rounds onto a bounding one: the region holds no level boundary to name
        detail += f"; L4/L5 falls on slice {l4_l5}, not strictly between {lo} and {hi}: left out"
        l4_l5 = None
    if off_scan:
        detail += f"; runs off the scan's {n} slices ({', '.join(off_scan)})"
    mapped = {name: point + offsets[name] for name, point in planes.items()}
    odd = _odd_geometry(planes, mapped)
    if odd:
        detail += f"; {odd}"
    return FoundRegion(
        Region(found["first"], found["last"], l4_l5), fit.confidence, bool(off_scan), detail, bool(odd)
    )


def _odd_geometry(planes: dict[str, np.ndarray], mapped: dict[str, np.ndarray]) -> str:
    """Why the found discs cannot be the reference's (spine length or L4/L5 share out of bounds), or ''."""
    length = abs(planes["last"][2] - planes["first"][2])
    found = abs(mapped["last"][2] - mapped["first"][2])
    ratio = found / max(length, 1e-6)
    if not MIN_LENGTH_RATIO <= ratio <= 1.0 / MIN_LENGTH_RATIO:
        return f"the region is {ratio:.2f} times the reference's length"
    if "l4_l5" in planes and found > 0:
        share = (planes["l4_l5"][2] - planes["first"][2]) / (planes["last"][2] - planes["first"][2])
        found_share = (mapped["l4_l5"][2] - mapped["first"][2]) / (mapped["last"][2] - mapped["first"][2])
        if abs(found_share - share) > MAX_L4_L5_SHARE_CHANGE:
            return f"L4/L5 sits at {found_share:.2f} of the region, {share:.2f} on the reference"
    return ""


@dataclass(frozen=True)
class _Fit:
    offset: np.ndarray  # reference point + offset = scan point (mm)
    ncc: float


@dataclass(frozen=True)
class _GlobalFit(_Fit):
    runner_up: float

    @property
    def confidence(self) -> float:
        return float(np.clip((self.ncc - self.runner_up) / max(1.0 - self.runner_up, 1e-6), 0.0, 1.0))


def _discs(region: Region) -> dict[str, int]:
    discs = {"first": region.first, "last": region.last}
    if region.l4_l5 is not None:
        discs["l4_l5"] = region.l4_l5
    return discs


def plane_point(image: sitk.Image, axial_index: int) -> np.ndarray:
    """The physical point at the centre of axial slice ``axial_index`` (index in the file's own order)."""
    centre = [(s - 1) / 2.0 for s in image.GetSize()]
    centre[axial_axis(image)] = float(axial_index)
    return np.array(image.TransformContinuousIndexToPhysicalPoint(centre))


def _axial_index(image: sitk.Image, point: np.ndarray) -> int:
    index = image.TransformPhysicalPointToContinuousIndex(tuple(float(v) for v in point))
    return int(round(index[axial_axis(image)]))


def _coarse(image: sitk.Image) -> sitk.Image:
    """Canonical (LPS, z up), float, on the coarse grid, intensities replaced by their rank (0..1)."""
    canonical = sitk.Cast(to_canonical(image), sitk.sitkFloat32)
    size = [
        max(int(round(n * s / g)), 1)
        for n, s, g in zip(canonical.GetSize(), canonical.GetSpacing(), GRID_MM, strict=True)
    ]
    coarse = sitk.Resample(
        sitk.SmoothingRecursiveGaussian(canonical, [g / 2.0 for g in GRID_MM]),
        size,
        sitk.Transform(),
        sitk.sitkLinear,
        canonical.GetOrigin(),
        GRID_MM,
        canonical.GetDirection(),
        0.0,
        sitk.sitkFloat32,
    )
    arr = sitk.GetArrayFromImage(coarse)
    # ranks: CT's few HU of soft-tissue contrast and MRI's arbitrary scale become comparable, and the
    # correlation is not ruled by bone or air
    ranks = np.empty(arr.size, np.float32)
    ranks[np.argsort(arr, axis=None, kind="stable")] = np.linspace(0.0, 1.0, arr.size, dtype=np.float32)
    out = sitk.GetImageFromArray(ranks.reshape(arr.shape))
    out.CopyInformation(coarse)
    return out


def _z_slab(image: sitk.Image, z_lo_mm: float, z_hi_mm: float) -> sitk.Image:
    """The coarse canonical image's slices between two physical z positions (clipped to the image)."""
    oz, sz, nz = image.GetOrigin()[2], image.GetSpacing()[2], image.GetSize()[2]
    lo = int(np.clip(np.floor((z_lo_mm - oz) / sz), 0, nz - 1))
    hi = int(np.clip(np.ceil((z_hi_mm - oz) / sz), lo, nz - 1))
    return image[:, :, lo : hi + 1]


def _z_top(image: sitk.Image) -> float:
    return image.GetOrigin()[2] + (image.GetSize()[2] - 1) * image.GetSpacing()[2]


def _z_centre(image: sitk.Image) -> float:
    return (image.GetOrigin()[2] + _z_top(image)) / 2.0


def _centroid_xy(image: sitk.Image) -> np.ndarray:
    arr = sitk.GetArrayViewFromImage(image)
    body = arr > 0.5  # brighter than the median: the body, not the air around it
    zz, yy, xx = np.nonzero(body) if body.any() else np.nonzero(np.ones_like(arr, bool))
    return np.array(image.TransformContinuousIndexToPhysicalPoint((xx.mean(), yy.mean(), zz.mean())))[:2]


def _global_alignment(slab: sitk.Image, scan: sitk.Image) -> _GlobalFit:
    """The exhaustive z search; its best CANDIDATES distinct shifts refined in plane (and z near them), the
    best refined one wins. The runner-up is the best alignment at least SEPARATION_MM away from it."""
    xy = _centroid_xy(scan) - _centroid_xy(slab)
    shifts, scores = _z_profile(slab, scan, xy)
    if len(shifts) == 0:  # no position keeps enough of the reference inside the scan: centre it, no trust
        centre = _z_centre(scan) - _z_centre(slab)
        return _GlobalFit(np.array([*xy, centre]), -1.0, 1.0)
    fits: list[_Fit] = []
    for index in np.argsort(-scores):
        if len(fits) >= CANDIDATES:
            break
        if all(abs(shifts[index] - f.offset[2]) >= SEPARATION_MM for f in fits):
            fits.append(_refine(slab, scan, _Fit(np.array([*xy, shifts[index]]), float(scores[index]))))
    fits.sort(key=lambda f: -f.ncc)
    best = fits[0]
    rivals = [f.ncc for f in fits[1:] if abs(f.offset[2] - best.offset[2]) >= SEPARATION_MM]
    rivals += [
        float(v) for dz, v in zip(shifts, scores, strict=True) if abs(dz - best.offset[2]) >= SEPARATION_MM
    ]
    return _GlobalFit(best.offset, best.ncc, max(rivals, default=-1.0))


def _refine(slab: sitk.Image, scan: sitk.Image, fit: _Fit) -> _Fit:
    """Coordinate search of the in-plane offset (one grid step, then half of one), with z free within
    SEPARATION_MM / 2, so the refined alignment stays the same alignment."""
    for step in (slab.GetSpacing()[0], slab.GetSpacing()[0] / 2):
        for axis in (0, 1, 0, 1):
            for sign in (-1.0, 1.0):
                trial = fit.offset[:2].copy()
                trial[axis] += sign * step
                near, near_scores = _z_profile(slab, scan, trial, around=(fit.offset[2], SEPARATION_MM / 2))
                if len(near) and near_scores.max() > fit.ncc:
                    k = int(np.argmax(near_scores))
                    fit = _Fit(np.array([*trial, near[k]]), float(near_scores[k]))
    return fit


def _disc_offset(disc_slab: sitk.Image, scan: sitk.Image, start: np.ndarray) -> np.ndarray:
    """The z shift within MAX_DISC_SHIFT_MM of ``start`` that best matches a thin slab around one disc: an
    exhaustive search (a gradient step from a few mm off can settle between two discs), refined below the
    grid step by a parabola through the best score and its neighbours. ``start`` when nothing fits."""
    shifts, scores = _z_profile(disc_slab, scan, start[:2], around=(start[2], MAX_DISC_SHIFT_MM))
    if len(shifts) == 0 or scores.max() <= -1.0:
        return start
    i = int(np.argmax(scores))
    dz = float(shifts[i])
    if 0 < i < len(scores) - 1:
        left, mid, right = scores[i - 1], scores[i], scores[i + 1]
        curvature = left - 2 * mid + right
        if curvature < 0:
            dz += 0.5 * (left - right) / curvature * float(shifts[i + 1] - shifts[i])
    return np.array([start[0], start[1], dz])


def _z_profile(
    slab: sitk.Image, scan: sitk.Image, xy: np.ndarray, around: tuple[float, float] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The correlation score (ITK's: the squared coefficient, signed) of the slab at every z shift in grid
    steps that keeps MIN_OVERLAP of it inside the scan, or only those within ``around`` = (centre, reach)
    in mm. The scan is resampled once onto the slab's in-plane grid; the shifts are array offsets."""
    sz, nz = slab.GetSpacing()[2], slab.GetSize()[2]
    slab_lo = slab.GetOrigin()[2]
    scan_lo = scan.GetOrigin()[2]
    scan_hi = scan_lo + (scan.GetSize()[2] - 1) * scan.GetSpacing()[2]
    reach = int(np.ceil((1.0 - MIN_OVERLAP) * nz))
    k_lo = int(np.floor((scan_lo - slab_lo) / sz)) - reach
    k_hi = int(np.ceil((scan_hi - slab_lo) / sz)) - nz + 1 + reach
    if k_hi < k_lo:  # the scan is shorter than the overlap asks: try every position that touches it
        k_lo, k_hi = k_hi, k_lo
    if around is not None:
        centre, reach_mm = around
        k_lo = max(k_lo, int(np.floor((centre - reach_mm) / sz)))
        k_hi = min(k_hi, int(np.ceil((centre + reach_mm) / sz)))
        if k_hi < k_lo:
            return np.array([]), np.array([])
    size = list(slab.GetSize())
    size[2] = nz + k_hi - k_lo
    shifted = sitk.Resample(
        scan,
        size,
        sitk.TranslationTransform(3, (float(xy[0]), float(xy[1]), 0.0)),
        sitk.sitkLinear,
        (*slab.GetOrigin()[:2], slab_lo + k_lo * sz),
        slab.GetSpacing(),
        slab.GetDirection(),
        np.nan,
        sitk.sitkFloat32,
    )
    moving = sitk.GetArrayFromImage(shifted)  # [z, y, x], NaN outside the scan
    fixed = sitk.GetArrayFromImage(slab)
    shifts, scores = [], []
    for k in range(k_hi - k_lo + 1):
        window = moving[k : k + nz]
        valid = np.isfinite(window)
        if valid.mean() < MIN_OVERLAP:
            continue
        a, b = fixed[valid], window[valid]
        a, b = a - a.mean(), b - b.mean()
        r = float((a * b).sum() / max(np.sqrt((a * a).sum() * (b * b).sum()), 1e-12))
        shifts.append((k + k_lo) * sz)
        scores.append(r * abs(r))
    return np.array(shifts), np.array(scores)
