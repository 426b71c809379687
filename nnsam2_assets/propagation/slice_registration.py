"""2-D registration in physical space (SimpleITK), the registration backend's primitives: linear (Mattes MI)
and diffeomorphic demons steps on intensities scaled by ``core.intensities``, one link of a slice chain
composed into a single displacement field, and the local NCC the confidence is measured with.

``carry_slice_labels`` carries any label map of one slice through its own scan with the same chain
(supervoxels use it). Every step is deterministic for identical inputs at a fixed thread count.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from nnsam2_assets.core.intensities import registration_intensities
from nnsam2_assets.propagation import boundary


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


def slice_image(vol: np.ndarray, z: int, like: sitk.Image) -> sitk.Image:
    """2-D sitk image of array slice ``z`` with the in-plane geometry of the 3-D image ``like``."""
    img = sitk.GetImageFromArray(np.ascontiguousarray(vol[z]))
    img.SetSpacing(like.GetSpacing()[:2])
    img.SetOrigin(like.GetOrigin()[:2])
    d = like.GetDirection()
    img.SetDirection((d[0], d[1], d[3], d[4]))
    return img


def box_slicer(
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


def is_blank(img: sitk.Image) -> bool:
    arr = sitk.GetArrayViewFromImage(img)
    return float(arr.max() - arr.min()) < 1e-6


# ---------------------------------------------------------------------------------------------- registration
def mask_image(mask: np.ndarray, like: sitk.Image, margin_mm: float) -> sitk.Image:
    """Binary uint8 metric mask: ``mask`` dilated by ``margin_mm`` (in-plane, physical)."""
    sp = like.GetSpacing()
    radius = [max(1, int(round(margin_mm / s))) for s in sp]
    img = sitk.GetImageFromArray(mask.astype(np.uint8))
    img.CopyInformation(like)
    return sitk.BinaryDilate(img, radius, sitk.sitkBox)


def affine(
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


def deformable(
    fixed: sitk.Image, moving: sitk.Image, linear: sitk.Transform, settings: RegistrationSettings, chain: bool
) -> sitk.Transform:
    """Demons refinement after ``linear``: returns fixed→moving as ONE displacement field on ``fixed``."""
    moving_on_fixed = sitk.Resample(moving, fixed, linear, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    its = settings.chain_demons_iterations if chain else settings.demons_iterations
    field = _demons(fixed, moving_on_fixed, its, settings.demons_shrink, settings.demons_sigma)
    # p -> p + d(p) (demons) -> linear(...): the composite applies the last-added transform first.
    return _as_field(sitk.CompositeTransform([linear, sitk.DisplacementFieldTransform(field)]), fixed)


def chain_step(
    acc: sitk.Transform,
    cur: sitk.Image,
    prev: sitk.Image,
    settings: RegistrationSettings,
    fixed_mask: sitk.Image | None = None,
) -> sitk.Transform:
    """One link of the chain: ``cur`` registered (affine, then demons) onto its solved neighbour ``prev``,
    composed with ``acc`` (prev -> seed) into one displacement field cur -> seed."""
    identity = sitk.Transform(2, sitk.sitkIdentity)
    lin = affine(
        cur, prev, identity, sitk.AffineTransform(2), fixed_mask=fixed_mask, shrink=(2, 1), iterations=40
    )
    return _as_field(sitk.CompositeTransform([acc, deformable(cur, prev, lin, settings, chain=True)]), cur)


def pixel_box(
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


def windowed_ncc(a: np.ndarray, b: np.ndarray, window: int | tuple[int, int]) -> np.ndarray:
    """Local normalised cross-correlation map of two 2-D arrays (box window in pixels: one side, or rows and
    columns)."""
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
    box = pixel_box(labels > 0, volume.GetSpacing()[:2], s.roi_margin_mm)
    (x0, x1), (y0, y1) = box
    roi_slice = box_slicer(arr, volume, box)
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
                if is_blank(cur) or is_blank(prev):
                    break
                acc = chain_step(acc, cur, prev, s)
                warped = sitk.Resample(seed_labels, cur, acc, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt16)
                out[z, y0:y1, x0:x1] = sitk.GetArrayFromImage(warped)
                prev = cur
    return out
