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
Inputs are never modified; CT is windowed only in the private copies used to drive the registration. The
2-D registration steps are in ``propagation.slice_registration``.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk
from scipy import ndimage

from nnsam2_assets.core.intensities import registration_intensities
from nnsam2_assets.core.masks import clean_class_masks
from nnsam2_assets.ingest.clicks import SliceClicks
from nnsam2_assets.propagation import boundary
from nnsam2_assets.propagation.base import (
    CONFIDENCE_COLUMNS,
    PropagationResult,
    slice_direction,
    target_seed_slice,
)
from nnsam2_assets.propagation.slice_registration import (
    FAST_SETTINGS,
    RegistrationSettings,
    affine,
    box_slicer,
    chain_step,
    deformable,
    is_blank,
    mask_image,
    pixel_box,
    sitk_threads,
    slice_image,
    windowed_ncc,
)

MODEL_ID = "sitk-demons-v2"  # v2: side edges refined on the target image
BACKEND_IDENTITY = f"registration|{MODEL_ID}"  # what its masks depend on besides the data


# -------------------------------------------------------------------------------------------------- backend
def ncc_window(spacing: tuple[float, ...], window_mm: float) -> tuple[int, int]:
    """The confidence's NCC box in pixels (rows, columns): ``window_mm`` on each side, odd, at least 3, so that
    rectangular pixels get a square box in mm."""
    rows, columns = (max(3, int(round(window_mm / mm)) | 1) for mm in (spacing[1], spacing[0]))
    return rows, columns


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
        ref_img = slice_image(ref_norm, seed_slice, reference)
        # Soft one-hot masks of the annotation (slightly smoothed so linear resampling gives sub-pixel edges).
        soft = [
            slice_image(ndimage.gaussian_filter((ann_slice == c).astype(np.float32), 0.6)[None], 0, reference)
            for c in range(1, n_classes + 1)
        ]

        probs = np.zeros((n_classes, *tgt_norm.shape), dtype=np.float32)
        ncc = np.zeros((n_tgt, n_classes), dtype=np.float64)
        tgt_full_seed = slice_image(tgt_norm, t_seed, target)
        if is_blank(tgt_full_seed) or is_blank(ref_img):
            return self._result(np.zeros(tgt_norm.shape, np.uint8), ncc, t_seed, n_classes)

        # 1. Seed level: cross-subject registration, reference slice -> target slice.
        ref_mask = mask_image(ann_slice > 0, ref_img, s.mask_margin_mm)
        init = sitk.CenteredTransformInitializer(
            tgt_full_seed,
            ref_img,
            sitk.Similarity2DTransform(),
            sitk.CenteredTransformInitializerFilter.MOMENTS,
        )
        sim = affine(tgt_full_seed, ref_img, sitk.Transform(2, sitk.sitkIdentity), init, shrink=(8, 4, 2))
        aff = affine(
            tgt_full_seed,
            ref_img,
            sim,
            sitk.AffineTransform(2),
            moving_mask=ref_mask,
            shrink=(4, 2, 1),
        )
        box = self._roi(aff, soft, tgt_full_seed, s.roi_margin_mm)
        (x0, x1), (y0, y1) = box

        roi_slice = box_slicer(tgt_norm, target, box)
        fixed = roi_slice(t_seed)
        seed_tx = deformable(fixed, ref_img, aff, s, chain=False)
        self._apply(seed_tx, fixed, ref_img, soft, t_seed, probs, ncc, box)

        # 2. Chain outwards in both directions, composing transforms back to the reference slice.
        for step in (1, -1):
            acc, prev = seed_tx, fixed
            prev_probs = probs[:, t_seed, y0:y1, x0:x1]
            for z in range(t_seed + step, n_tgt if step > 0 else -1, step):
                cur = roi_slice(z)
                if is_blank(cur) or is_blank(prev):
                    break
                fg = prev_probs.sum(0) > 0.5
                fmask = mask_image(fg, cur, s.mask_margin_mm) if fg.any() else None
                acc = chain_step(acc, cur, prev, s, fmask)
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
            labels, tgt_norm, n_classes, band, s.boundary_beta, keep_slices={t_seed} if own_seed else (),
            aspect=boundary.row_aspect(target.GetSpacing()),
        )  # fmt: skip
        labels = clean_class_masks(labels, n_classes)
        if own_seed:  # after the clean-up too: an island or a hole the annotator drew is theirs to keep
            labels[t_seed] = ann_slice
        return self._result(labels, ncc, t_seed, n_classes)

    @staticmethod
    def _roi(
        tx: sitk.Transform, soft: list[sitk.Image], grid: sitk.Image, margin_mm: float
    ) -> tuple[tuple[int, int], tuple[int, int]]:
        """Pixel box (x, y) on the target slice around the linearly mapped annotation plus a margin."""
        union = sum(sitk.Resample(m, grid, tx, sitk.sitkLinear, 0.0, sitk.sitkFloat32) for m in soft)
        return pixel_box(sitk.GetArrayViewFromImage(union) > 0.25, grid.GetSpacing(), margin_mm)

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
        window = ncc_window(grid.GetSpacing(), self.settings.ncc_window_mm)
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
