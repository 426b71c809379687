"""The synthetic lumbar anatomy of the demo phantoms: tissue codes, subject shape parameters and one axial
slice's tissue map and 4-class labels (``demo.phantom`` renders them).

Anatomy is defined in millimetres in a patient frame (X towards the patient's LEFT, Y POSTERIOR, origin on
the body's centre) and in an *anatomical level* coordinate ``t`` along z: t = 0 at the L5/S1 disc, 0.5 at
L4/L5 and 1 at L3/L4, so subjects with different region lengths still share their anatomy level by level,
as real scans cropped between the same discs do. Along t the muscles change the way they do in vivo
(multifidus large caudally, erector spinae large cranially), posterior elements come and go per vertebra,
and the lordosis moves the whole spine posteriorly in caudal slices. That drift is what makes copying one
slice's mask to the whole stack a weak baseline (Dice <= 0.75) while neighbouring slices stay similar
enough for registration to track them.

Subjects draw their shape parameters around a population mean (:data:`PARAM_SPECS`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np
from scipy import ndimage

# Tissue codes of Phantom.tissue (``demo.phantom`` holds what each looks like in every rendering)
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
# the discs from the region's lower end upwards, at t = 0, 0.5, 1, ... (the phantom's level coordinate)
DISC_NAMES = ("L5/S1", "L4/L5", "L3/L4", "L2/L3", "L1/L2", "T12/L1", "T11/T12")

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


def slice_anatomy(
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
