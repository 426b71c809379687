"""Deterministic synthetic lumbar phantoms: the project's own demo cohort (no real data may ship).

One phantom is an axial stack through the L3/L4 -> L5/S1 region plus a few padding slices each end, with
exact 4-class labels of the lumbar paraspinal muscles (1 right_es, 2 right_mf, 3 left_mf, 4 left_es) and
four renderings of the same anatomy: Dixon water and fat, a T2-like MRI and a CT in HU.

Anatomy is defined in millimetres in a patient frame (X towards the patient's LEFT, Y POSTERIOR, origin on
the body's centre) and in an *anatomical level* coordinate ``t`` along z: t = 0 at the L5/S1 disc, 0.5 at
L4/L5 and 1 at L3/L4, so subjects with different region lengths still share their anatomy level by level,
as real scans cropped between the same discs do. Along t the muscles change the way they do in vivo
(multifidus large caudally, erector spinae large cranially), posterior elements come and go per vertebra,
and the lordosis moves the whole spine posteriorly in caudal slices. That drift is what makes copying one
slice's mask to the whole stack a weak baseline (Dice <= 0.75) while neighbouring slices stay similar
enough for registration to track them.

Subjects draw their shape parameters around a population mean (:data:`PARAM_SPECS`); a cohort contains one
member exactly at the mean (the "typical" scan a representative-scan ranking should find), and the others
come in antithetic pairs (+d, -d) so the typical member is the centre of the cohort in parameter space.

Arrays are canonical LPS ``[z, y, x]``: x index low = patient RIGHT, y index high = POSTERIOR, z index 0 =
most inferior slice. Images carry an identity direction; :func:`write_demo_dataset` may store some scans
in other orientations (physical geometry preserved) so canonicalisation is exercised.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from nnsam2_assets.core.labels import class_map, merge_sides, slice_dice
from nnsam2_assets.metrics.quant import fat_ratio

# Tissue codes of Phantom.tissue. Properties: proton density (rho), base fat fraction (ff), T2-weighted
# brightness of the water component (t2w) and CT attenuation of the lean (non-fat) component (hu).
AIR, SUBCUT_FAT, OTHER_MUSCLE, LPM, CANCELLOUS, CORTICAL, DISC, CSF, VISCERA, FASCIA, RETRO_FAT, LIGAMENT = (
    range(12)
)
TISSUE_NAMES = (
    "air",
    "subcutaneous_fat",
    "other_muscle",
    "lpm",
    "cancellous_bone",
    "cortical_bone",
    "disc",
    "csf",
    "viscera",
    "fascia",
    "retroperitoneal_fat",
    "ligament",
)
_RHO = np.array([0.0, 1.0, 0.9, 0.9, 0.75, 0.08, 0.9, 1.0, 0.85, 0.7, 1.0, 0.35], np.float32)
_FF = np.array([0.0, 0.93, 0.04, 0.04, 0.45, 0.1, 0.02, 0.0, 0.2, 0.6, 0.9, 0.05], np.float32)
_T2W = np.array([0.0, 0.3, 0.28, 0.28, 0.45, 0.1, 0.8, 1.0, 0.5, 0.3, 0.3, 0.12], np.float32)
_HU = np.array([-1000, 30, 60, 60, 680, 900, 90, 12, 38, 40, 30, 65], np.float32)
FAT_HU = -100.0
FAT_T2 = 0.85  # T2 TSE brightness of fat (fat is bright without fat suppression)

DEFAULT_SHAPE_YX = (128, 128)
DEFAULT_SPACING = (1.6, 1.6, 4.0)  # SimpleITK order (sx, sy, sz), mm
# the discs from the region's lower end upwards, at t = 0, 0.5, 1, ... (the phantom's level coordinate)
DISC_NAMES = ("L5/S1", "L4/L5", "L3/L4", "L2/L3", "L1/L2", "T12/L1", "T11/T12")
DEFAULT_PAD = (2, 3)  # extra slices below / above the region; unequal so a z flip moves the region indices


# --------------------------------------------------------------------------------------------------
# Shape parameters
# --------------------------------------------------------------------------------------------------

# name: (population mean, population SD, lower bound, upper bound). Lengths in mm, angles in degrees.
PARAM_SPECS: dict[str, tuple[float, float, float, float]] = {
    "body_a": (88.0, 5.0, 76.0, 96.0),  # body half-width (limited by the 205 mm demo field of view)
    "body_b": (76.0, 4.5, 64.0, 86.0),  # body half-depth
    "subcut_fat": (10.0, 3.5, 3.0, 20.0),  # posterior subcutaneous fat thickness
    "es_scale": (1.0, 0.12, 0.7, 1.3),
    "mf_scale": (1.0, 0.12, 0.7, 1.3),
    "asymmetry": (0.0, 0.05, -0.15, 0.15),  # log left/right muscle size ratio
    "es_growth": (0.6, 0.12, 0.3, 0.9),  # erector spinae size gain from L5/S1 to L3/L4 (fraction)
    "mf_shrink": (0.5, 0.1, 0.25, 0.7),  # multifidus size loss from L5/S1 to L3/L4 (fraction)
    "es_x": (38.0, 2.5, 31.0, 45.0),  # erector spinae centre, distance from the midline
    "es_rot": (22.0, 7.0, 5.0, 40.0),  # erector spinae long-axis tilt (lateral edge anterior)
    "mf_x": (14.0, 1.2, 11.0, 17.0),
    "vb_radius": (20.0, 1.8, 16.0, 24.0),  # vertebral body half-width
    "tilt_mm": (21.0, 4.0, 13.0, 30.0),  # lordosis: posterior shift of the spine from L3/L4 to L5/S1
    "lateral_curve": (0.0, 3.0, -8.0, 8.0),  # scoliosis-like lateral bow over the region
    "shift_x": (0.0, 3.0, -8.0, 8.0),  # patient position in the scanner
    "shift_y": (0.0, 3.0, -8.0, 8.0),
    "rotation": (0.0, 3.0, -8.0, 8.0),  # in-plane body rotation
    "es_h2": (0.0, 0.05, -0.12, 0.12),  # boundary harmonics of the muscle outlines (cos/sin, order 2, 3)
    "es_g2": (0.0, 0.05, -0.12, 0.12),
    "es_h3": (0.0, 0.04, -0.1, 0.1),
    "es_g3": (0.0, 0.04, -0.1, 0.1),
    "mf_h2": (0.0, 0.05, -0.12, 0.12),
    "mf_g2": (0.0, 0.05, -0.12, 0.12),
    "region_mm": (48.0, 4.0, 40.0, 56.0),  # L5/S1 to L3/L4 distance (demo-sized spine)
    "base_ff": (0.04, 0.01, 0.015, 0.08),  # diffuse intramuscular fat fraction
    "infiltration": (0.1, 0.05, 0.01, 0.3),  # fraction of muscle in fatty patches
}


@dataclass(frozen=True)
class PhantomParams:
    """Subject shape parameters; see :data:`PARAM_SPECS` for units and population distribution."""

    body_a: float
    body_b: float
    subcut_fat: float
    es_scale: float
    mf_scale: float
    asymmetry: float
    es_growth: float
    mf_shrink: float
    es_x: float
    es_rot: float
    mf_x: float
    vb_radius: float
    tilt_mm: float
    lateral_curve: float
    shift_x: float
    shift_y: float
    rotation: float
    es_h2: float
    es_g2: float
    es_h3: float
    es_g3: float
    mf_h2: float
    mf_g2: float
    region_mm: float
    base_ff: float
    infiltration: float

    def as_vector(self) -> np.ndarray:
        return np.array([getattr(self, f.name) for f in fields(self)], dtype=float)

    def z_scores(self) -> np.ndarray:
        """Standardised deviation from the population mean, per parameter (0 for the typical subject)."""
        mean = np.array([PARAM_SPECS[f.name][0] for f in fields(self)])
        sd = np.array([PARAM_SPECS[f.name][1] for f in fields(self)])
        return (self.as_vector() - mean) / sd


def population_mean_params() -> PhantomParams:
    return PhantomParams(**{name: spec[0] for name, spec in PARAM_SPECS.items()})


def params_from_z(z: np.ndarray, variation: float = 1.0) -> PhantomParams:
    """Parameters at ``mean + variation * sd * z`` (clipped to each parameter's plausible range)."""
    values = {}
    for zi, (name, (mean, sd, lo, hi)) in zip(z, PARAM_SPECS.items(), strict=True):
        values[name] = float(np.clip(mean + variation * sd * zi, lo, hi))
    return PhantomParams(**values)


# --------------------------------------------------------------------------------------------------
# The phantom
# --------------------------------------------------------------------------------------------------


@dataclass
class Phantom:
    """One synthetic subject on a canonical LPS grid.

    ``labels``: uint8 [z, y, x] 4-class ground truth. ``tissue``: uint8 tissue codes (:data:`TISSUE_NAMES`).
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


def _blob(
    X: np.ndarray,
    Y: np.ndarray,
    cx: float,
    cy: float,
    ax: float,
    ay: float,
    rot_deg: float = 0.0,
    harmonics: tuple[tuple[float, float], ...] = (),
) -> np.ndarray:
    """Normalised radius of a rotated ellipse with a harmonic boundary: <= 1 inside, smooth level set."""
    phi = math.radians(rot_deg)
    dx, dy = X - cx, Y - cy
    u = (dx * math.cos(phi) + dy * math.sin(phi)) / ax
    v = (-dx * math.sin(phi) + dy * math.cos(phi)) / ay
    r = np.hypot(u, v)
    if not harmonics:
        return r
    theta = np.arctan2(v, u)
    rb = np.ones_like(r)
    for k, (a, b) in enumerate(harmonics, start=2):
        rb += a * np.cos(k * theta) + b * np.sin(k * theta)
    return r / np.maximum(rb, 0.3)


def _level_phase(t: float) -> float:
    """Position within the current vertebra: 0 at the disc below, 1 at the disc above (two levels per region)."""
    return (t / 0.5) % 1.0


def _slice_anatomy(
    t: float, p: PhantomParams, X: np.ndarray, Y: np.ndarray, disc_half_t: float
) -> tuple[np.ndarray, np.ndarray]:
    """Tissue codes and 4-class labels of one axial slice at anatomical level ``t``.

    X, Y are mm coordinates (X to patient left, Y posterior) relative to the body centre of this slice.
    """
    tissue = np.zeros(X.shape, np.uint8)
    labels = np.zeros(X.shape, np.uint8)
    tc = t - 0.5
    # beyond a level of the region (long scans) the spine's course levels off instead of curving on
    tl = min(max(tc, -1.0), 1.0)

    # lordosis: caudal slices cut the spine further posteriorly; a slight bow adds curvature
    spine_dy = -p.tilt_mm * tl - 6.0 * tl * tl
    spine_dx = p.lateral_curve * (4.0 * tl * tl - 1.0 / 3.0) + 1.5 * math.sin(2.0 * math.pi * t)
    # the body outline follows the spine partly; the pelvis widens caudally
    body_a = p.body_a * (1.0 - 0.08 * tl)
    body_b = p.body_b
    bx, by = 0.35 * spine_dx, 0.6 * spine_dy
    body_r = np.power(np.abs((X - bx) / body_a) ** 2.3 + np.abs((Y - by) / body_b) ** 2.3, 1 / 2.3)
    inside = body_r <= 1.0
    tissue[inside] = VISCERA

    # subcutaneous fat: thicker posteriorly, thinner anterolaterally
    Yb = Y - by
    fat_mm = p.subcut_fat * (0.55 + 0.45 * np.clip((Yb / body_b + 1.0) / 2.0, 0, 1) ** 0.7)
    scale = 1.0 - fat_mm / np.minimum(body_a, body_b)
    inner = body_r <= scale
    tissue[inside & ~inner] = SUBCUT_FAT
    # abdominal wall / lateral muscles: a band just inside the fat, anterior and lateral
    wall = inner & (body_r > scale - 9.0 / body_b) & (Yb < 0.35 * body_b)
    tissue[wall] = OTHER_MUSCLE

    # spine landmarks in mm, moving with the lordosis
    sx = spine_dx
    vb_cy = 8.0 + spine_dy
    vb_ax, vb_ay = p.vb_radius, p.vb_radius * 0.75
    canal_cy = vb_cy + vb_ay + 8.0
    canal_r = 7.0
    phase = _level_phase(t)
    near_disc = abs(t - round(2.0 * t) / 2.0) < disc_half_t  # a disc at every half unit of t

    # retroperitoneal fat behind the viscera, around the spine
    f_retro = _blob(X, Y, sx, canal_cy + 8.0, 0.8 * body_a, 42.0)
    tissue[inner & ~wall & (f_retro <= 1.0)] = RETRO_FAT

    # psoas (grows caudally) and quadratus lumborum (fades caudally towards the iliac crest)
    for side in (-1.0, 1.0):
        Xs = side * (X - sx)
        psoas_s = max(1.25 - 0.5 * t, 0.35)  # small but present up to T12
        f_ps = _blob(Xs, Y, p.vb_radius + 9.0 * psoas_s, vb_cy - 2.0, 10.0 * psoas_s, 11.0 * psoas_s, -20.0)
        tissue[inner & (f_ps <= 1.0)] = OTHER_MUSCLE
        ql_s = float(np.clip(0.4 + 0.8 * t, 0.3, 1.2))
        f_ql = _blob(Xs, Y, p.es_x + 24.0, canal_cy - 4.0, 13.0 * ql_s, 7.0 * ql_s, 35.0)
        tissue[inner & (f_ql <= 1.0)] = OTHER_MUSCLE

    # paraspinal muscles: level sets per class, each voxel to the deepest-inside muscle
    # sizes level off beyond the region (the sacrum / upper lumbar levels change more slowly)
    ts = float(np.clip(t, -0.1, 1.1))
    es_size = p.es_scale * (1.0 - p.es_growth / 2.0 + p.es_growth * ts)
    mf_size = p.mf_scale * (1.0 + p.mf_shrink / 2.0 - p.mf_shrink * ts)
    wob = 0.04 * math.sin(2.0 * math.pi * (t + 0.15))  # smooth level-to-level wobble of the outlines
    es_h = ((p.es_h2 + wob, p.es_g2), (p.es_h3, p.es_g3 - wob))
    mf_h = ((p.mf_h2, p.mf_g2 + wob),)
    muscle_cy = canal_cy + 17.0
    level_sets = []
    # in label order 1..4: right ES, right MF, left MF, left ES (side -1 = patient right = low x)
    for side, kind in ((-1.0, "es"), (-1.0, "mf"), (1.0, "mf"), (1.0, "es")):
        side_gain = math.exp(side * p.asymmetry / 2.0)
        Xs = side * (X - sx)
        if kind == "es":
            s = es_size * side_gain
            cx = p.es_x + 12.0 * tl + 4.0 * (s - 1.0)
            f = _blob(Xs, Y, cx, muscle_cy - 1.0 - 5.0 * tl, 22.0 * s, 16.0 * s**0.8, p.es_rot, es_h)
        else:
            s = mf_size * side_gain
            cx = p.mf_x + 3.0 * (s - 1.0)
            f = _blob(Xs, Y, cx, muscle_cy + 1.5 * (s - 1.0), 10.5 * s, 16.0 * s**0.9, -8.0, mf_h)
        # a muscle never crosses the midline
        f = np.where(Xs > 1.0, f, np.inf)
        level_sets.append(f)
    stack = np.stack(level_sets)
    best = np.argmin(stack, axis=0)
    muscle = (np.min(stack, axis=0) <= 1.0) & inner
    tissue[muscle] = LPM
    labels[muscle] = (best[muscle] + 1).astype(np.uint8)

    # bone and canal override soft tissue
    f_vb = _blob(X, Y, sx, vb_cy, vb_ax, vb_ay)
    body_mask = f_vb <= 1.0
    if near_disc:
        tissue[body_mask] = DISC
    else:
        tissue[body_mask] = CANCELLOUS
        tissue[body_mask & (f_vb > 1.0 - 1.8 / vb_ay)] = CORTICAL
    Xm = np.abs(X - sx)
    canal = np.hypot(X - sx, Y - canal_cy) <= canal_r
    # lamina/pedicle ring around the canal, joined to the vertebral body; facets at the disc levels
    ring = (np.hypot(X - sx, Y - canal_cy) <= canal_r + 4.0) & ~canal & (vb_cy < Y)
    lamina_on = 0.15 < phase < 0.9 and not near_disc
    bone = np.zeros(X.shape, bool)
    if lamina_on:
        bone |= ring
        # laminae sloping posterolaterally, forming the groove the multifidus lies in
        lam = (
            (canal_cy < Y)
            & (canal_cy + 9.0 > Y)
            & (Xm < 13.0)
            & (np.abs(Xm - (Y - canal_cy) * 0.35 - 7.0) < 3.0)
        )
        bone |= lam
    else:
        # facet joints and ligamentum flavum at the disc level
        for side in (-1.0, 1.0):
            bone |= np.hypot(X - sx - side * 13.0, Y - canal_cy - 3.0) <= 4.5
        tissue[ring & ~bone] = LIGAMENT
    if 0.3 < phase < 0.75 and not near_disc:
        # transverse processes between psoas and erector spinae
        bone |= (Xm > vb_ax - 4.0) & (Xm < p.es_x + 8.0) & (np.abs(Y - (canal_cy - 5.0) - 0.15 * Xm) < 2.5)
    # spinous process: long in the mid/lower part of each vertebra; an interspinous ligament between
    sp_len = 24.0 * float(np.clip(np.sin(math.pi * (phase - 0.05) / 0.8), 0.0, 1.0)) if not near_disc else 0.0
    midline = (Xm < 2.5) & (canal_cy + canal_r < Y) & inner
    spinous = midline & (canal_cy + canal_r + 3.0 + sp_len > Y)
    tissue[midline] = LIGAMENT
    bone |= spinous
    bone &= inner
    tissue[bone & ~body_mask] = CORTICAL
    tissue[bone & ~body_mask & (np.hypot(X - sx, Y - canal_cy) > canal_r + 1.5) & ~spinous] = CANCELLOUS
    tissue[canal] = CSF
    labels[(tissue != LPM)] = 0

    # a thin fascia line separates erector spinae and multifidus: the multifidus voxels touching its ES
    square = np.ones((3, 3), bool)
    for mf, es in ((2, 1), (3, 4)):
        edge = (labels == mf) & ndimage.binary_dilation(labels == es, structure=square)
        labels[edge] = 0
        tissue[edge] = FASCIA
    # keep one connected piece per label (clipping by bone can leave crumbs)
    for label in (1, 2, 3, 4):
        comp, n = ndimage.label(labels == label)
        if n > 1:
            sizes = ndimage.sum_labels(np.ones_like(comp), comp, index=np.arange(1, n + 1))
            crumbs = (comp > 0) & (comp != 1 + int(np.argmax(sizes)))
            labels[crumbs] = 0
            tissue[crumbs] = FASCIA
    return tissue, labels


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
        tissue[z], labels[z] = _slice_anatomy(float(level_t[z]), p, X, Y, disc_half_t)

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
