"""Shared propagation interface: the result type, the backend protocol, level alignment and the registry.

A propagator carries ONE annotated axial slice of a reference scan to every slice of a target scan, both
superior and inferior from the target's seed level. The backends (``propagation.backends``) implement it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import pandas as pd
import SimpleITK as sitk

from nnsam2_assets.ingest.clicks import SliceClicks

CONFIDENCE_COLUMNS = [
    "slice",
    "class_id",
    "confidence",
    "predicted_iou",
    "object_score",
    "present",
    "area",
    "direction",
    "distance",
]
DIRECTIONS = ("seed", "superior", "inferior")


@dataclass(frozen=True)
class PropagationResult:
    """Masks on the target's canonical grid plus one confidence row per (target slice, class).

    masks: uint8 [z, y, x], values 0..K, non-overlapping.
    confidence: columns ``CONFIDENCE_COLUMNS``; slice (target z index), class_id, confidence in [0, 1],
        predicted_iou (nan if the backend has none), object_score (logit, nan if none), present (mask non-empty
        and the backend believes the object is there), area (pixels), direction in ``DIRECTIONS``,
        distance = |slice - target seed slice|.
    """

    masks: np.ndarray
    confidence: pd.DataFrame
    backend: str
    model_id: str


@runtime_checkable
class Propagator(Protocol):
    """A backend, built once per run; ``propagate`` is called once per target scan.

    ``parallel_safe``: its results depend on the inputs alone and it pickles, so the scans of a dataset may
    be propagated in worker processes (``propagation.parallel``)."""

    backend: str
    model_id: str
    parallel_safe: bool

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
        """``frames_dir``: where a backend that tracks image frames keeps them (others ignore it).
        ``clicks``: the click prompts the annotation was made from, on its seed slice; a backend with a point
        prompt (SAM2) prompts with them, the others propagate the annotation made of them."""
        ...


def target_seed_slice(seed_slice: int, n_ref: int, n_tgt: int) -> int:
    """The target slice at the same relative position in the region as the reference's seed slice."""
    return int(round(seed_slice * (n_tgt - 1) / max(n_ref - 1, 1)))


def slice_direction(z: int, seed: int) -> str:
    """'seed', 'superior' (higher z in canonical LPS) or 'inferior'."""
    if z == seed:
        return "seed"
    return "superior" if z > seed else "inferior"
