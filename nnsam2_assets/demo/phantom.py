"""Deterministic synthetic lumbar phantoms: the project's own demo cohort (no real data may ship).

One phantom is an axial stack through the L3/L4 -> L5/S1 region plus a few padding slices each end, with
exact 4-class labels of the lumbar paraspinal muscles (1 right_es, 2 right_mf, 3 left_mf, 4 left_es) and
four renderings of the same anatomy (``demo.anatomy``): Dixon water and fat, a T2-like MRI and a CT in HU.

A cohort contains one member exactly at the population mean (the "typical" scan a representative-scan
ranking should find), and the others come in antithetic pairs (+d, -d) so the typical member is the centre
of the cohort in parameter space.

Arrays are canonical LPS ``[z, y, x]``: x index low = patient RIGHT, y index high = POSTERIOR, z index 0 =
most inferior slice. Images carry an identity direction; :func:`write_demo_dataset` may store some scans
in other orientations (physical geometry preserved) so canonicalisation is exercised.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from nnsam2_assets.core.labels import class_map, merge_sides, slice_dice
from nnsam2_assets.demo.anatomy import (
    AIR,
    DISC_NAMES,
    OTHER_MUSCLE,
    PARAM_SPECS,
    VISCERA,
    PhantomParams,
    params_from_z,
    population_mean_params,
    slice_anatomy,
)
from nnsam2_assets.metrics.quant import fat_ratio

# Rendering properties per tissue code (``demo.anatomy``): proton density (rho), base fat fraction (ff),
# T2-weighted brightness of the water component (t2w) and CT attenuation of the lean (non-fat) component (hu).
_RHO = np.array([0.0, 1.0, 0.9, 0.9, 0.75, 0.08, 0.9, 1.0, 0.85, 0.7, 1.0, 0.35], np.float32)
_FF = np.array([0.0, 0.93, 0.04, 0.04, 0.45, 0.1, 0.02, 0.0, 0.2, 0.6, 0.9, 0.05], np.float32)
_T2W = np.array([0.0, 0.3, 0.28, 0.28, 0.45, 0.1, 0.8, 1.0, 0.5, 0.3, 0.3, 0.12], np.float32)
_HU = np.array([-1000, 30, 60, 60, 680, 900, 90, 12, 38, 40, 30, 65], np.float32)
FAT_HU = -100.0
FAT_T2 = 0.85  # T2 TSE brightness of fat (fat is bright without fat suppression)


DEFAULT_SHAPE_YX = (128, 128)
DEFAULT_SPACING = (1.6, 1.6, 4.0)  # SimpleITK order (sx, sy, sz), mm
DEFAULT_PAD = (2, 3)  # extra slices below / above the region; unequal so a z flip moves the region indices


@dataclass
class Phantom:
    """One synthetic subject on a canonical LPS grid.

    ``labels``: uint8 [z, y, x] 4-class ground truth. ``tissue``: uint8 tissue codes (``demo.anatomy.TISSUE_NAMES``).
    ``images``: float32 canonical sitk images "water", "fat", "t2" (MRI units) and "ct" (HU), with noise.
    ``clean``: the same renderings before noise, as arrays. ``region``: (first, last) canonical slice of the
    L5/S1..L3/L4 region (inclusive). ``fat_ratio_truth``: per 4-class label, the Dixon fat ratio
    sum(F)/(sum(F)+sum(W)) over the label on the noise-free images (what an ideal mask measures).
    """

    params: PhantomParams
    seed: int
    labels: np.ndarray
    tissue: np.ndarray
    fat_fraction: np.ndarray
    images: dict[str, sitk.Image]
    clean: dict[str, np.ndarray]
    region: tuple[int, int]
    fat_ratio_truth: dict[int, float]
    hu_truth: dict[int, float]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    level_t: np.ndarray = field(repr=False)  # anatomical level coordinate of each slice

    @property
    def labels2(self) -> np.ndarray:
        """2-class ground truth (1 = right LPM, 2 = left LPM)."""
        return merge_sides(self.labels)

    def label_image(self, n_classes: int = 4) -> sitk.Image:
        arr = self.labels if n_classes == 4 else self.labels2
        return self._wrap(arr.astype(np.uint8))

    def _wrap(self, arr: np.ndarray) -> sitk.Image:
        img = sitk.GetImageFromArray(arr)
        img.SetSpacing(self.spacing)
        img.SetOrigin(self.origin)
        return img

    @property
    def seed_slice_middle(self) -> int:
        lo, hi = self.region
        return (lo + hi) // 2

    @property
    def disc_slices(self) -> dict[str, int]:
        """Every disc inside the stack, named, at its nearest slice (a disc sits at each half unit of t)."""
        n_region = self.region[1] - self.region[0]
        out = {}
        for k, name in enumerate(DISC_NAMES):
            z = int(round(self.region[0] + k * n_region / 2.0))
            if 0 <= z < self.labels.shape[0]:
                out[name] = z
        return out

    @property
    def seed_slice_top(self) -> int:
        """The L3/L4 (most superior) slice of the region, as the reference method annotates."""
        return self.region[1]


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: tuple[float, ...]) -> np.ndarray:
    """Gaussian-filtered white noise rescaled to zero mean and unit SD (smooth random texture)."""
    n = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma, mode="wrap")
    return (n - n.mean()) / (n.std() + 1e-9)


def generate_phantom(
    params: PhantomParams | None = None,
    seed: int = 0,
    shape_yx: tuple[int, int] = DEFAULT_SHAPE_YX,
    spacing: tuple[float, float, float] = DEFAULT_SPACING,
    pad: tuple[int, int] = DEFAULT_PAD,
    levels_above: int = 0,
) -> Phantom:
    """Build one subject. ``seed`` drives only the nuisance (noise, bias field, fat patches, textures).

    The number of slices follows the subject's region length: round(region_mm / sz) + 1 region slices plus
    ``pad`` (below, above) extra slices, plus ``levels_above`` whole vertebral levels above L3/L4 (3 covers
    the T12/L1 disc: a typical lumbar scan, longer than the region).
    """
    p = params or population_mean_params()
    rng = np.random.default_rng(seed)
    sx_mm, sy_mm, sz_mm = (float(s) for s in spacing)
    ny, nx = shape_yx
    n_region = max(int(round(p.region_mm / sz_mm)) + 1, 3)
    nz = n_region + pad[0] + pad[1] + int(math.ceil(levels_above * (n_region - 1) / 2.0))
    region = (pad[0], pad[0] + n_region - 1)
    # level coordinate per slice: 0 at the L5/S1 disc (first region slice), 1 at L3/L4 (last one)
    level_t = (np.arange(nz) - region[0]) / (n_region - 1)
    disc_half_t = 4.5 / (sz_mm * (n_region - 1))

    # in-plane mm grid around the body centre, with the patient's position and rotation in the scanner
    xs = (np.arange(nx) - (nx - 1) / 2.0) * sx_mm
    ys = (np.arange(ny) - (ny - 1) / 2.0) * sy_mm
    Xg, Yg = np.meshgrid(xs, ys)  # [y, x]
    rot = math.radians(p.rotation)
    Xc, Yc = Xg - p.shift_x, Yg - p.shift_y
    # float32 grids: the per-slice level sets dominate the run time
    X = (Xc * math.cos(rot) + Yc * math.sin(rot)).astype(np.float32)
    Y = (-Xc * math.sin(rot) + Yc * math.cos(rot)).astype(np.float32)

    tissue = np.zeros((nz, ny, nx), np.uint8)
    labels = np.zeros((nz, ny, nx), np.uint8)
    for z in range(nz):
        tissue[z], labels[z] = slice_anatomy(float(level_t[z]), p, X, Y, disc_half_t)

    ff = _FF[tissue].copy()
    # patchy intramuscular fat: a smooth random field thresholded at the subject's infiltration fraction,
    # multifidus more affected than erector spinae (as in low-back-pain cohorts)
    patches = _smooth_noise(rng, (nz, ny, nx), (0.7, 2.2, 2.2))
    for labs, frac in (((1, 4), p.infiltration), ((2, 3), min(1.5 * p.infiltration, 0.45))):
        m = np.isin(labels, labs)
        if m.any() and frac > 0:
            thr = np.quantile(patches[m], 1.0 - frac)
            soft = 1.0 / (1.0 + np.exp(-(patches[m] - thr) / 0.15))
            ff[m] = p.base_ff + (0.55 - p.base_ff) * soft
    other = tissue == OTHER_MUSCLE
    ff[other] = p.base_ff + 0.1 * np.clip(patches[other], 0, None)
    texture = _smooth_noise(rng, (nz, ny, nx), (0.5, 1.5, 1.5))
    visc = tissue == VISCERA
    ff[visc] = np.clip(0.2 + 0.15 * texture[visc], 0.0, 0.95)
    ff = ff.astype(np.float32)
    rho = _RHO[tissue]

    # partial volume: renderings are slightly blurred in-plane; labels stay exact voxel truth
    def pv(a: np.ndarray) -> np.ndarray:
        return ndimage.gaussian_filter(a.astype(np.float32), (0, 0.6, 0.6))

    bias = _bias_field(rng, X, Y)[None]
    s0 = 1000.0
    water_c = pv(s0 * rho * (1.0 - ff)) * bias
    fat_c = pv(s0 * rho * ff) * bias
    t2_c = pv(s0 * rho * ((1.0 - ff) * _T2W[tissue] + ff * FAT_T2)) * bias
    hu = _HU[tissue] * (1.0 - ff) + FAT_HU * ff
    hu[tissue == AIR] = -1000.0
    # a few bowel-gas pockets in the viscera (CT only: MRI shows them as signal voids anyway)
    gas = visc & (texture < -2.0)
    hu[gas] = -900.0
    ct_c = pv(hu)

    sigma_mri = 0.012 * s0
    water = np.abs(water_c + rng.normal(0, sigma_mri, water_c.shape))
    fat = np.abs(fat_c + rng.normal(0, sigma_mri, fat_c.shape))
    t2 = np.hypot(t2_c + rng.normal(0, sigma_mri, t2_c.shape), rng.normal(0, sigma_mri, t2_c.shape))
    ct = ct_c + rng.normal(0, 12.0, ct_c.shape)

    origin = (float(xs[0]), float(ys[0]), -0.5 * (nz - 1) * sz_mm + float(rng.uniform(-20, 20)))
    images = {}
    for name, arr in (("water", water), ("fat", fat), ("t2", t2), ("ct", ct)):
        img = sitk.GetImageFromArray(arr.astype(np.float32))
        img.SetSpacing((sx_mm, sy_mm, sz_mm))
        img.SetOrigin(origin)
        images[name] = img
    clean = {"water": water_c, "fat": fat_c, "t2": t2_c, "ct": ct_c}
    fr_truth = {k: fat_ratio(fat_c, water_c, labels == k) for k in class_map(4)}
    hu_truth = {k: float(ct_c[labels == k].mean()) for k in class_map(4)}
    return Phantom(
        params=p,
        seed=seed,
        labels=labels,
        tissue=tissue,
        fat_fraction=ff,
        images=images,
        clean=clean,
        region=region,
        fat_ratio_truth=fr_truth,
        hu_truth=hu_truth,
        spacing=(sx_mm, sy_mm, sz_mm),
        origin=origin,
        level_t=level_t,
    )


def _bias_field(rng: np.random.Generator, X: np.ndarray, Y: np.ndarray) -> np.ndarray:
    """Mild smooth receive-coil bias (brighter posteriorly, near the spine coil), up to about +-15 %."""
    nx_, ny_ = X / 100.0, Y / 100.0
    c = rng.normal(0, 0.04, 3)
    log_b = (0.12 + c[0]) * ny_ + c[1] * nx_ - 0.08 * nx_**2 + c[2] * nx_ * ny_
    return np.exp(log_b).astype(np.float32)


# --------------------------------------------------------------------------------------------------
# Cohorts
# --------------------------------------------------------------------------------------------------


@dataclass
class Cohort:
    members: list[Phantom]
    typical_index: int  # the member generated at the population-mean parameters


def plan_cohort(n: int, seed: int, variation: float = 1.0) -> tuple[int, list[PhantomParams], list[int]]:
    """Typical index, parameters and nuisance seeds of ``generate_cohort(n, seed, variation)`` (cheap)."""
    if n < 1:
        raise ValueError("a cohort needs at least one member")
    rng = np.random.default_rng(seed)
    typical = int(rng.integers(n))
    seeds = [int(s) for s in rng.integers(0, 2**31 - 1, size=n)]
    n_pairs = (n - 1 + 1) // 2
    draws = rng.standard_normal((n_pairs, len(PARAM_SPECS)))
    # antithetic pairs (+d, -d) keep the typical member at the cohort's centre
    devs = [sign * d for d in draws for sign in (1.0, -1.0)][: n - 1]
    params = []
    it = iter(devs)
    for i in range(n):
        params.append(population_mean_params() if i == typical else params_from_z(next(it), variation))
    return typical, params, seeds


def population_typical_index(n: int, seed: int) -> int:
    """Index of the population-mean member in ``generate_cohort(n, seed)`` (without generating it)."""
    return plan_cohort(n, seed)[0]


def generate_cohort(n: int, seed: int = 0, variation: float = 1.0, **kwargs) -> Cohort:
    """``n`` subjects; one (``typical_index``) at the population mean, the others around it.

    ``variation`` scales the population SD (0 = all subjects share the mean shape). ``kwargs`` go to
    :func:`generate_phantom` (shape_yx, spacing, pad).
    """
    typical, params, seeds = plan_cohort(n, seed, variation)
    members = [generate_phantom(p, s, **kwargs) for p, s in zip(params, seeds, strict=True)]
    return Cohort(members, typical)


# --------------------------------------------------------------------------------------------------
# Difficulty measures
# --------------------------------------------------------------------------------------------------


def copy_slice_dice(phantom: Phantom, seed_slice: int | None = None, region_only: bool = True) -> float:
    """Mean 2-class slice Dice of copying the seed slice's mask onto every slice (seed included): the floor."""
    lab = phantom.labels2
    seed_slice = phantom.seed_slice_middle if seed_slice is None else seed_slice
    lo, hi = phantom.region if region_only else (0, lab.shape[0] - 1)
    copied = np.repeat(lab[seed_slice][None], hi - lo + 1, axis=0)
    return float(np.nanmean(slice_dice(copied, lab[lo : hi + 1], 2)))


def adjacent_slice_dice(phantom: Phantom) -> np.ndarray:
    """2-class Dice between each pair of neighbouring slices (length nz - 1)."""
    lab = phantom.labels2
    return slice_dice(lab[:-1], lab[1:], 2)
