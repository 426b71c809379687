"""More than one annotated slice: every target slice is propagated from the nearest annotated level.

Each annotated slice of the reference is a prompt of its own: the backend propagates it alone to the whole
target, and each target slice takes its mask and confidence from the prompt whose target level
(``target_seed_slice``) is nearest (ties to the lower slice). The confidence record says which prompt each
slice came from (``prompt_slice``). With one annotated slice this is the backend's own propagation.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk

from nnsam2_assets.ingest.clicks import SliceClicks
from nnsam2_assets.propagation.base import PropagationResult, Propagator, target_seed_slice


def nearest_prompt(prompts: Sequence[int], n_ref: int, n_tgt: int) -> np.ndarray:
    """Per target slice, the annotated reference slice whose target level is nearest."""
    levels = np.array([target_seed_slice(p, n_ref, n_tgt) for p in prompts])
    order = np.argsort(prompts, kind="stable")
    z = np.arange(n_tgt)[:, None]
    best = order[np.argmin(np.abs(z - levels[order][None, :]), axis=1)]  # argmin keeps the first (lower) tie
    return np.asarray(prompts)[best]


def only_slice(annotation: sitk.Image, z: int) -> sitk.Image:
    """The label image with array slice ``z`` alone kept (axis 0: the axial slices of a canonical image)."""
    arr = sitk.GetArrayFromImage(annotation)
    one = np.zeros_like(arr)
    one[z] = arr[z]
    image = sitk.GetImageFromArray(one)
    image.CopyInformation(annotation)
    return image


def propagate_from_slices(
    propagator: Propagator,
    reference: sitk.Image,
    annotation: sitk.Image,
    prompts: Sequence[int],
    target: sitk.Image,
    modality: str,
    frames_dir: Path | None = None,
    clicks: SliceClicks | None = None,
) -> PropagationResult:
    """The target's masks from every annotated slice in ``prompts``, each slice from the nearest one."""
    prompts = sorted(int(p) for p in prompts)
    if len(prompts) == 1:
        result = propagator.propagate(
            reference, annotation, prompts[0], target, modality, frames_dir=frames_dir, clicks=clicks
        )
        return _with_prompt(result, result.masks, result.confidence.assign(prompt_slice=prompts[0]))
    if clicks is not None:
        raise ValueError("click prompts lie on one slice; an annotation of several slices is drawn")
    n_ref, n_tgt = reference.GetSize()[2], target.GetSize()[2]
    source = nearest_prompt(prompts, n_ref, n_tgt)
    masks = np.zeros(sitk.GetArrayViewFromImage(target).shape, np.uint8)
    tables = []
    for prompt in prompts:
        rows = np.flatnonzero(source == prompt)
        if not len(rows):
            continue
        result = propagator.propagate(
            reference,
            only_slice(annotation, prompt),
            prompt,
            target,
            modality,
            frames_dir=frames_dir / f"prompt_{prompt}" if frames_dir is not None else None,
        )
        masks[rows] = result.masks[rows]
        table = result.confidence
        tables.append(table[table["slice"].isin(rows)].assign(prompt_slice=prompt))
    confidence = pd.concat(tables, ignore_index=True).sort_values(["slice", "class_id"], ignore_index=True)
    return _with_prompt(result, masks, confidence)


def _with_prompt(like: PropagationResult, masks: np.ndarray, confidence: pd.DataFrame) -> PropagationResult:
    return PropagationResult(masks=masks, confidence=confidence, backend=like.backend, model_id=like.model_id)
