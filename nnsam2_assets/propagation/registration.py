"""Weight-free label propagation by 2-D image registration (SimpleITK), the default backend.

Scheme (per target scan):
1. Seed: the annotated reference slice is registered onto the target slice at the same relative level
   (similarity on the whole slice, then affine restricted to the muscles, then multi-resolution diffeomorphic
   demons inside a region of interest around the muscles). This is the only cross-subject step.
2. Chain: every further target slice is registered (affine + demons) onto its already-solved neighbour towards
   the seed, superior and inferior. The transforms are COMPOSED into one displacement field per slice that maps
   the target slice straight back to the annotated reference slice, so the reference's soft class masks are
   resampled exactly once per slice (no blur accumulation from re-warping masks again and again).
3. Labels: argmax over the warped soft class masks and the background; each side's edge re-placed along the
   target's own image edges within a few millimetres (``propagation.boundary``, a random walker); per class
   the largest connected component in 2-D per slice and in 3-D, holes filled. On the reference itself, the
   annotated slice is the annotation.
4. Confidence: windowed normalised cross-correlation between the target slice and the reference slice warped
   through the same composed transform, inside a band around each class mask, damped by the distance from
   the seed level (the chain accumulates error with every step).

All registration happens in physical space, so reference and target may differ in in-plane size and spacing.
Inputs are never modified; CT is windowed only in the private copies used to drive the registration.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk
from scipy import ndimage

from nnsam2_assets.core.masks import largest_component
from nnsam2_assets.ingest.clicks import SliceClicks
from nnsam2_assets.propagation import boundary
from nnsam2_assets.propagation.base import (
    CONFIDENCE_COLUMNS,
    PropagationResult,
    slice_direction,
    target_seed_slice,
)

MODEL_ID = "sitk-demons-v2"  # v2: side edges refined on the target image
BACKEND_IDENTITY = f"registration|{MODEL_ID}"  # what its masks depend on besides the data
CT_WINDOW = (
    -200.0,
    300.0,
)  # HU: soft tissue and bone edges, without air/metal extremes dominating the metric


@dataclass(frozen=True)
class RegistrationSettings:
    """Registration knobs. ``fast`` trades some accuracy for ~2x speed (fewer demons iterations)."""

    roi_margin_mm: float = 40.0  # around the seed-level muscles; the chain works inside this box only
    mask_margin_mm: float = 20.0  # affine metric region around the (propagated) muscles
    demons_iterations: tuple[int, ...] = (40, 30, 20)  # per level, coarse to fine
    demons_shrink: tuple[int, ...] = (4, 2, 1)
    demons_sigma: float = (
        2.0  # displacement-field smoothing in pixels (regularisation; 1.5 and 2.5 were worse)
    )
    chain_demons_iterations: tuple[int, ...] = (30, 20, 10)
    ncc_window_mm: float = 9.0
    confidence_decay_slices: float = 40.0  # distance damping of the confidence, in slices
    boundary_band_mm: float = boundary.BAND_MM  # the side edges' random walker (0: off)
    boundary_beta: float = boundary.BETA


FAST_SETTINGS = RegistrationSettings(demons_iterations=(30, 20, 8), chain_demons_iterations=(20, 10, 4))


@contextlib.contextmanager
def sitk_threads(n: int | None) -> Iterator[None]:
    """Temporarily set SimpleITK's global default thread count (restored afterwards)."""
    if not n:
        yield
        return
    previous = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(int(n))
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(previous)


# ----------------------------------------------------------------------------------------------- intensities
def registration_intensities(arr: np.ndarray, modality: str) -> np.ndarray:
    """Float32 copy scaled to ~[0, 1] for the metrics: CT windowed in HU, MRI robust percentiles."""
    a = np.asarray(arr, dtype=np.float32)
    if modality.lower() == "ct":
        lo, hi = CT_WINDOW
    else:
        fg = a[a > 0]
        if fg.size < 16:
            return np.zeros_like(a)
        lo, hi = (float(v) for v in np.percentile(fg, [0.5, 99.5]))
    if hi <= lo:
        return np.zeros_like(a)
    return np.clip((a - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def _slice_image(vol: np.ndarray, z: int, like: sitk.Image) -> sitk.Image:
    """2-D sitk image of array slice ``z`` with the in-plane geometry of the 3-D image ``like``."""
    img = sitk.GetImageFromArray(np.ascontiguousarray(vol[z]))
    img.SetSpacing(like.GetSpacing()[:2])
    img.SetOrigin(like.GetOrigin()[:2])
    d = like.GetDirection()
    img.SetDirection((d[0], d[1], d[3], d[4]))
    return img


def _box_slicer(
    vol: np.ndarray, like: sitk.Image, box: tuple[tuple[int, int], tuple[int, int]]
) -> Callable[[int], sitk.Image]:
    """``z -> `` slice z of ``vol`` inside the pixel box ((x0, x1), (y0, y1)), at its physical place in ``like``."""
    (x0, x1), (y0, y1) = box
    origin = like.TransformIndexToPhysicalPoint((int(x0), int(y0), 0))[:2]
    d = like.GetDirection()

    def roi_slice(z: int) -> sitk.Image:
        img = sitk.GetImageFromArray(np.ascontiguousarray(vol[z, y0:y1, x0:x1]))
        img.SetSpacing(like.GetSpacing()[:2])
        img.SetOrigin(origin)
        img.SetDirection((d[0], d[1], d[3], d[4]))
        return img

    return roi_slice


def _is_blank(img: sitk.Image) -> bool:
    arr = sitk.GetArrayViewFromImage(img)
    return float(arr.max() - arr.min()) < 1e-6


# ---------------------------------------------------------------------------------------------- registration
def _mask_image(mask: np.ndarray, like: sitk.Image, margin_mm: float) -> sitk.Image:
    """Binary uint8 metric mask: ``mask`` dilated by ``margin_mm`` (in-plane, physical)."""
    sp = like.GetSpacing()
    radius = [max(1, int(round(margin_mm / s))) for s in sp]
    img = sitk.GetImageFromArray(mask.astype(np.uint8))
    img.CopyInformation(like)
    return sitk.BinaryDilate(img, radius, sitk.sitkBox)


def _affine(
    fixed: sitk.Image,
    moving: sitk.Image,
    initial: sitk.Transform,
    transform: sitk.Transform,
    fixed_mask: sitk.Image | None = None,
    moving_mask: sitk.Image | None = None,
    shrink: tuple[int, ...] = (4, 2),
    iterations: int = 80,
) -> sitk.Transform:
    """Intensity-based linear registration (Mattes MI); returns the composite initial∘optimised transform."""
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(0.3, 1234)  # fixed seed: identical inputs give identical masks
    if fixed_mask is not None:
        reg.SetMetricFixedMask(fixed_mask)
    if moving_mask is not None:
        reg.SetMetricMovingMask(moving_mask)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(
        learningRate=1.0, minStep=1e-3, numberOfIterations=iterations, gradientMagnitudeTolerance=1e-6
    )
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel(list(shrink))
    reg.SetSmoothingSigmasPerLevel([max(0, s // 2) for s in shrink])
    reg.SetMovingInitialTransform(initial)
    reg.SetInitialTransform(transform, inPlace=False)
    try:
        opt = reg.Execute(fixed, moving)
    except RuntimeError:
        # Too few samples (blank slice, tiny overlap): keep what we had rather than fail the whole scan.
        return initial
    return sitk.CompositeTransform([initial, opt])


def _demons(
    fixed: sitk.Image,
    moving_on_fixed: sitk.Image,
    iterations: tuple[int, ...],
    shrinks: tuple[int, ...],
    sigma: float,
) -> sitk.Image:
    """Multi-resolution diffeomorphic demons; returns a displacement field (vector float64) on ``fixed``."""
    moving_on_fixed = sitk.HistogramMatching(moving_on_fixed, fixed, 128, 7, True)
    field: sitk.Image | None = None
    for its, shrink in zip(iterations, shrinks, strict=True):
        if its <= 0:
            continue
        f = fixed if shrink == 1 else _shrink(fixed, shrink)
        m = moving_on_fixed if shrink == 1 else _shrink(moving_on_fixed, shrink)
        demons = sitk.DiffeomorphicDemonsRegistrationFilter()
        demons.SetNumberOfIterations(int(its))
        demons.SetSmoothDisplacementField(True)
        demons.SetStandardDeviations(sigma)
        if field is None:
            field = demons.Execute(f, m)
        else:
            init = sitk.Resample(field, f, sitk.Transform(), sitk.sitkLinear, 0.0, field.GetPixelID())
            field = demons.Execute(f, m, init)
    if field is None:
        field = sitk.Image(fixed.GetSize(), sitk.sitkVectorFloat64, 2)
        field.CopyInformation(fixed)
    if field.GetSize() != fixed.GetSize():
        field = sitk.Resample(field, fixed, sitk.Transform(), sitk.sitkLinear, 0.0, field.GetPixelID())
    return sitk.Cast(field, sitk.sitkVectorFloat64)


def _shrink(img: sitk.Image, factor: int) -> sitk.Image:
    """Gaussian-smoothed, shrunk copy (same physical extent)."""
    smoothed = sitk.SmoothingRecursiveGaussian(img, [0.5 * factor * s for s in img.GetSpacing()])
    return sitk.Shrink(smoothed, [factor, factor])


def _as_field(transform: sitk.Transform, grid: sitk.Image) -> sitk.Transform:
    """Collapse any transform into one displacement-field transform sampled on ``grid``."""
    field = sitk.TransformToDisplacementField(
        transform,
        sitk.sitkVectorFloat64,
        grid.GetSize(),
        grid.GetOrigin(),
        grid.GetSpacing(),
        grid.GetDirection(),
    )
    return sitk.DisplacementFieldTransform(field)


def _deformable(
    fixed: sitk.Image, moving: sitk.Image, linear: sitk.Transform, settings: RegistrationSettings, chain: bool
) -> sitk.Transform:
    """Demons refinement after ``linear``: returns fixed→moving as ONE displacement field on ``fixed``."""
    moving_on_fixed = sitk.Resample(moving, fixed, linear, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    its = settings.chain_demons_iterations if chain else settings.demons_iterations
    field = _demons(fixed, moving_on_fixed, its, settings.demons_shrink, settings.demons_sigma)
    # p -> p + d(p) (demons) -> linear(...): the composite applies the last-added transform first.
    return _as_field(sitk.CompositeTransform([linear, sitk.DisplacementFieldTransform(field)]), fixed)


def _chain_step(
    acc: sitk.Transform,
    cur: sitk.Image,
    prev: sitk.Image,
    settings: RegistrationSettings,
    fixed_mask: sitk.Image | None = None,
) -> sitk.Transform:
    """One link of the chain: ``cur`` registered (affine, then demons) onto its solved neighbour ``prev``,
    composed with ``acc`` (prev -> seed) into one displacement field cur -> seed."""
    identity = sitk.Transform(2, sitk.sitkIdentity)
    lin = _affine(
        cur, prev, identity, sitk.AffineTransform(2), fixed_mask=fixed_mask, shrink=(2, 1), iterations=40
    )
    return _as_field(sitk.CompositeTransform([acc, _deformable(cur, prev, lin, settings, chain=True)]), cur)


def _pixel_box(
    mask: np.ndarray, spacing_xy: tuple[float, float], margin_mm: float
) -> tuple[tuple[int, int], tuple[int, int]]:
    """Pixel box ((x0, x1), (y0, y1)) around a slice mask plus ``margin_mm``; the whole slice when it is empty."""
    ny, nx = mask.shape
    ys, xs = np.nonzero(mask)
    if xs.size == 0:
        return (0, nx), (0, ny)
    mx, my = (int(math.ceil(margin_mm / s)) for s in spacing_xy)
    return (max(0, xs.min() - mx), min(nx, xs.max() + 1 + mx)), (
        max(0, ys.min() - my),
        min(ny, ys.max() + 1 + my),
    )


# ------------------------------------------------------------------------------------------------ labelling
def clean_class_masks(labels: np.ndarray, n_classes: int) -> np.ndarray:
    """Per class: largest component per slice (2-D) and in 3-D, holes filled; classes never overlap."""
    out = np.zeros_like(labels, dtype=np.uint8)
    for c in range(1, n_classes + 1):
        m = labels == c
        if not m.any():
            continue
        m = np.stack([ndimage.binary_fill_holes(largest_component(s)) for s in m])
        m = largest_component(m)
        out[m & (out == 0)] = c
    return out


def windowed_ncc(a: np.ndarray, b: np.ndarray, window: int) -> np.ndarray:
    """Local normalised cross-correlation map of two 2-D arrays (box window, pixels)."""
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    mu_a = ndimage.uniform_filter(a, window)
    mu_b = ndimage.uniform_filter(b, window)
    cov = ndimage.uniform_filter(a * b, window) - mu_a * mu_b
    va = ndimage.uniform_filter(a * a, window) - mu_a**2
    vb = ndimage.uniform_filter(b * b, window) - mu_b**2
    denom = np.sqrt(np.clip(va, 0, None) * np.clip(vb, 0, None))
    return np.where(denom > 1e-8, cov / np.maximum(denom, 1e-8), 0.0)


# ------------------------------------------------------------------------------------------ within one scan
def carry_slice_labels(
    volume: sitk.Image,
    labels: np.ndarray,
    seed: int,
    modality: str,
    settings: RegistrationSettings | None = None,
    threads: int | None = 1,
) -> np.ndarray:
    """Carry a label map of one slice through its own scan: [Z, Y, X] uint16 labels.

    Each slice is registered (affine, then demons) onto its already-solved neighbour towards ``seed`` and the
    transforms are composed back to the seed, as the backend's chain does; the label map is then warped ONCE
    per slice by nearest neighbour, so any number of labels (supervoxels) costs one resampling per slice.
    Works inside the labels' box plus the settings' ROI margin.
    """
    s = settings or RegistrationSettings()
    arr = registration_intensities(sitk.GetArrayViewFromImage(volume), modality)
    out = np.zeros(arr.shape, np.uint16)
    if not labels.any():
        return out
    box = _pixel_box(labels > 0, volume.GetSpacing()[:2], s.roi_margin_mm)
    (x0, x1), (y0, y1) = box
    roi_slice = _box_slicer(arr, volume, box)
    seed_img = roi_slice(seed)
    seed_labels = sitk.GetImageFromArray(np.ascontiguousarray(labels[y0:y1, x0:x1].astype(np.uint16)))
    seed_labels.CopyInformation(seed_img)
    out[seed, y0:y1, x0:x1] = labels[y0:y1, x0:x1]
    with sitk_threads(threads):
        for step in (1, -1):
            acc: sitk.Transform = sitk.Transform(2, sitk.sitkIdentity)
            prev = seed_img
            for z in range(seed + step, arr.shape[0] if step > 0 else -1, step):
                cur = roi_slice(z)
                if _is_blank(cur) or _is_blank(prev):
                    break
                acc = _chain_step(acc, cur, prev, s)
                warped = sitk.Resample(seed_labels, cur, acc, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt16)
                out[z, y0:y1, x0:x1] = sitk.GetArrayFromImage(warped)
                prev = cur
    return out


# -------------------------------------------------------------------------------------------------- backend
class RegistrationPropagator:
    """Slice-wise registration propagation (see module docstring). Stateless between targets."""

    backend = "registration"
    model_id = MODEL_ID
    parallel_safe = True  # stateless and single-threaded: a worker's masks are the serial run's

    def __init__(
        self, threads: int | None = 1, fast: bool = False, settings: RegistrationSettings | None = None
    ):
        # one thread by default: ITK's multithreaded metric reductions sum in a varying order, so two runs on
        # identical inputs differed by hundreds of voxels; a rerun must reproduce its masks (data versions)
        self.threads = threads
        self.settings = settings or (FAST_SETTINGS if fast else RegistrationSettings())

    def propagate(
        self,
        reference: sitk.Image,
        annotation: sitk.Image,
        seed_slice: int,
        target: sitk.Image,
        modality: str,
        frames_dir: Path | None = None,
        clicks: SliceClicks | None = None,
    ) -> PropagationResult:
        # registration works on the volumes themselves, not on frames, and on the mask made of any clicks
        del frames_dir, clicks
        with sitk_threads(self.threads):
            return self._propagate(reference, annotation, seed_slice, target, modality)

    # The work is split into small steps so each stays readable; no state survives a call.
    def _propagate(
        self,
        reference: sitk.Image,
        annotation: sitk.Image,
        seed_slice: int,
        target: sitk.Image,
        modality: str,
    ) -> PropagationResult:
        s = self.settings
        ann = sitk.GetArrayFromImage(annotation)
        if ann.shape != sitk.GetArrayViewFromImage(reference).shape:
            raise ValueError("annotation must lie on the reference grid")
        ann_slice = ann[seed_slice].astype(np.int64)
        n_classes = int(ann_slice.max())
        if n_classes < 1:
            raise ValueError(f"annotation slice {seed_slice} is empty")
        n_ref = reference.GetSize()[2]
        n_tgt = target.GetSize()[2]
        t_seed = target_seed_slice(seed_slice, n_ref, n_tgt)

        ref_norm = registration_intensities(sitk.GetArrayViewFromImage(reference), modality)
        tgt_norm = registration_intensities(sitk.GetArrayViewFromImage(target), modality)
        ref_img = _slice_image(ref_norm, seed_slice, reference)
        # Soft one-hot masks of the annotation (slightly smoothed so linear resampling gives sub-pixel edges).
        soft = [
            _slice_image(
                ndimage.gaussian_filter((ann_slice == c).astype(np.float32), 0.6)[None], 0, reference
            )
            for c in range(1, n_classes + 1)
        ]

        probs = np.zeros((n_classes, *tgt_norm.shape), dtype=np.float32)
        ncc = np.zeros((n_tgt, n_classes), dtype=np.float64)
        tgt_full_seed = _slice_image(tgt_norm, t_seed, target)
        if _is_blank(tgt_full_seed) or _is_blank(ref_img):
            return self._result(np.zeros(tgt_norm.shape, np.uint8), ncc, t_seed, n_classes)

        # 1. Seed level: cross-subject registration, reference slice -> target slice.
        ref_mask = _mask_image(ann_slice > 0, ref_img, s.mask_margin_mm)
        init = sitk.CenteredTransformInitializer(
            tgt_full_seed,
            ref_img,
            sitk.Similarity2DTransform(),
            sitk.CenteredTransformInitializerFilter.MOMENTS,
        )
        sim = _affine(tgt_full_seed, ref_img, sitk.Transform(2, sitk.sitkIdentity), init, shrink=(8, 4, 2))
        aff = _affine(
            tgt_full_seed,
            ref_img,
            sim,
            sitk.AffineTransform(2),
            moving_mask=ref_mask,
            shrink=(4, 2, 1),
        )
        box = self._roi(aff, soft, tgt_full_seed, s.roi_margin_mm)
        (x0, x1), (y0, y1) = box

        roi_slice = _box_slicer(tgt_norm, target, box)
        fixed = roi_slice(t_seed)
        seed_tx = _deformable(fixed, ref_img, aff, s, chain=False)
        self._apply(seed_tx, fixed, ref_img, soft, t_seed, probs, ncc, box)

        # 2. Chain outwards in both directions, composing transforms back to the reference slice.
        for step in (1, -1):
            acc, prev = seed_tx, fixed
            prev_probs = probs[:, t_seed, y0:y1, x0:x1]
            for z in range(t_seed + step, n_tgt if step > 0 else -1, step):
                cur = roi_slice(z)
                if _is_blank(cur) or _is_blank(prev):
                    break
                fg = prev_probs.sum(0) > 0.5
                fmask = _mask_image(fg, cur, s.mask_margin_mm) if fg.any() else None
                acc = _chain_step(acc, cur, prev, s, fmask)
                self._apply(acc, cur, ref_img, soft, z, probs, ncc, box)
                prev, prev_probs = cur, probs[:, z, y0:y1, x0:x1]

        # propagating onto the reference itself: its annotated slice is known exactly
        own_seed = tgt_norm.shape == ref_norm.shape and np.array_equal(tgt_norm[t_seed], ref_norm[seed_slice])
        del ref_norm

        # 3. Labels: argmax against an implicit background of 1 - sum(probabilities).
        background = np.clip(1.0 - probs.sum(0), 0.0, 1.0)
        labels = (np.argmax(np.concatenate([background[None], probs]), axis=0)).astype(np.uint8)
        if own_seed:
            labels[t_seed] = ann_slice
        band = boundary.band_pixels(target.GetSpacing()[0], s.boundary_band_mm)
        labels = boundary.refine_side_boundaries(
            labels, tgt_norm, n_classes, band, s.boundary_beta, keep_slices={t_seed} if own_seed else ()
        )
        labels = clean_class_masks(labels, n_classes)
        return self._result(labels, ncc, t_seed, n_classes)

    @staticmethod
    def _roi(
        tx: sitk.Transform, soft: list[sitk.Image], grid: sitk.Image, margin_mm: float
    ) -> tuple[tuple[int, int], tuple[int, int]]:
        """Pixel box (x, y) on the target slice around the linearly mapped annotation plus a margin."""
        union = sum(sitk.Resample(m, grid, tx, sitk.sitkLinear, 0.0, sitk.sitkFloat32) for m in soft)
        return _pixel_box(sitk.GetArrayViewFromImage(union) > 0.25, grid.GetSpacing(), margin_mm)

    def _apply(
        self,
        tx: sitk.Transform,
        grid: sitk.Image,
        ref_img: sitk.Image,
        soft: list[sitk.Image],
        z: int,
        probs: np.ndarray,
        ncc: np.ndarray,
        box: tuple[tuple[int, int], tuple[int, int]],
    ) -> None:
        """Resample the reference soft masks (once) onto target slice z and score the local image agreement."""
        (x0, x1), (y0, y1) = box
        for k, m in enumerate(soft):
            warped = sitk.Resample(m, grid, tx, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
            probs[k, z, y0:y1, x0:x1] = sitk.GetArrayFromImage(warped)
        warped_img = sitk.GetArrayFromImage(
            sitk.Resample(ref_img, grid, tx, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
        )
        fixed = sitk.GetArrayViewFromImage(grid)
        window = max(3, int(round(self.settings.ncc_window_mm / grid.GetSpacing()[0])) | 1)
        local = windowed_ncc(fixed, warped_img, window)
        for k in range(len(soft)):
            band = ndimage.binary_dilation(probs[k, z, y0:y1, x0:x1] > 0.5, iterations=2)
            ncc[z, k] = float(local[band].mean()) if band.any() else 0.0

    def _result(self, labels: np.ndarray, ncc: np.ndarray, t_seed: int, n_classes: int) -> PropagationResult:
        rows = []
        decay = self.settings.confidence_decay_slices
        for z in range(labels.shape[0]):
            dist = abs(z - t_seed)
            for c in range(1, n_classes + 1):
                area = int((labels[z] == c).sum())
                present = area > 0
                conf = float(np.clip(ncc[z, c - 1], 0.0, 1.0)) * math.exp(-dist / decay) if present else 0.0
                rows.append(
                    {
                        "slice": z,
                        "class_id": c,
                        "confidence": conf,
                        "predicted_iou": float("nan"),
                        "object_score": float("nan"),
                        "present": present,
                        "area": area,
                        "direction": slice_direction(z, t_seed),
                        "distance": dist,
                    }
                )
        df = pd.DataFrame(rows, columns=CONFIDENCE_COLUMNS)
        df = df.astype({"slice": int, "class_id": int, "area": int, "distance": int, "present": bool})
        return PropagationResult(masks=labels, confidence=df, backend=self.backend, model_id=self.model_id)
