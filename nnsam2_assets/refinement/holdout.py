"""The internal check that needs no expert: does refinement beat propagation on this dataset?

The reference scan's annotated slice (the primary one, nearest the region's middle, when several are
annotated; and its neighbours within ``HOLDOUT_HALF_WIDTH_MM``) is held out of every stage's training: those voxels are nnU-Net's ignore label in the reference's training labels. The
stage-3 model, cleaned and edge-finished as the final masks are (but without their consensus with the
propagated mask, which on this slice is the annotation itself), is then scored on the annotated slice: the only voxels of
the dataset whose truth is known and that no model has learnt. The refined masks replace the propagated ones
for the whole dataset only when that held-out Dice reaches ``MIN_HELDOUT_DICE``; otherwise the dataset's
final masks are its propagated masks. The decision never reads expert labels.

Why the neighbours too: adjacent slices of the reference carry nearly the annotation itself (the chain
propagates one slice at a time), so a model trained on them would be scored on what it had seen. The
score is still within-subject, so it is optimistic against the other scans; the threshold sits above what
registration propagation reaches across subjects on the TUM pair (about 0.89 volume Dice), so a model that
has not learnt the muscles never replaces them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from nnsam2_assets.core.imaging import read_array, read_header
from nnsam2_assets.core.labels import mean_dice, to_class_space
from nnsam2_assets.core.layout import DatasetLayout
from nnsam2_assets.core.masks import clean_labels
from nnsam2_assets.ingest.annotation import annotated_slices, read_annotation_meta

HOLDOUT_HALF_WIDTH_MM = 4.0
MIN_HELDOUT_DICE = 0.90  # 2-class (side) Dice on the held-out annotated slice


@dataclass(frozen=True)
class HeldOutSlab:
    """The reference scan's slices that no stage trains on (canonical crop indices)."""

    scan: str
    seed_slice: int
    first: int
    last: int  # inclusive

    def hide(self, label: np.ndarray, ignore_value: int) -> np.ndarray:
        out = label.copy()
        out[self.first : self.last + 1] = ignore_value
        return out

    def record(self) -> list:
        """As a stage's ``current.json`` keeps it: [scan, first, last]."""
        return [self.scan, self.first, self.last]


def slab_changed(pointer: dict, dataset: str, slab: HeldOutSlab | None) -> bool:
    """Whether the models of ``pointer`` (a stage's ``current.json``) held out another slab of ``dataset``
    than ``slab``, the one its annotation holds out now (``held_out_slab``): an edit that moved the primary
    annotated slice onto one the models trained on as an exact label. Models recorded before slabs were kept,
    and a dataset with no slab now, count as unchanged."""
    trained = pointer.get("held_out_slabs", {}).get(dataset)
    return trained is not None and slab is not None and slab.record() != list(trained)


def slab_reach(slice_spacing_mm: float) -> int:
    """Slices each side of the seed within the slab's half-width. A spacing stored in single precision (0.8 mm
    is 0.800000011920929 in NIfTI) must still reach the slice exactly at the half-width, or that slice, next
    to the one scored, would be trained on."""
    return int(math.floor(HOLDOUT_HALF_WIDTH_MM / slice_spacing_mm + 1e-6))


def held_out_slab(layout: DatasetLayout) -> HeldOutSlab | None:
    """The dataset's held-out slab, or None before the annotation is written or once its reference scan no
    longer ingests (the dataset is then out of the pool)."""
    if not layout.annotation_meta.exists():
        return None
    meta = read_annotation_meta(layout)
    reference, z = meta["reference"], int(meta["seed_slice"])
    if not layout.scan_image(reference).exists():
        return None
    header = read_header(layout.scan_image(reference))  # its size and spacing only, not the scan itself
    reach = slab_reach(header.GetSpacing()[2])
    return HeldOutSlab(reference, z, max(0, z - reach), min(header.GetSize()[2] - 1, z + reach))


def exact_label_slices(layout: DatasetLayout) -> dict[str, list[int]]:
    """{scan: canonical slices whose labels are known exactly and that every stage trains on}: the
    reference's annotated slices other than the held-out primary one (and outside its slab)."""
    slab = held_out_slab(layout)
    if slab is None:
        return {}
    slices = [z for z in annotated_slices(read_annotation_meta(layout)) if not slab.first <= z <= slab.last]
    return {slab.scan: slices} if slices else {}


@dataclass(frozen=True)
class RefinementDecision:
    heldout_dice: float
    min_heldout_dice: float
    use_refined: bool
    reason: str = ""  # why the refined masks are not used although the held-out Dice says they could be

    @property
    def source(self) -> str:
        return "refined" if self.use_refined else "propagated"

    def as_dict(self) -> dict:
        return {**asdict(self), "source": self.source}


def decide(
    reference_prediction: np.ndarray,
    model_classes: int,
    layout: DatasetLayout,
    annotation_classes: int,
    min_dice: float = MIN_HELDOUT_DICE,
    trained_on_it: bool = False,
) -> RefinementDecision:
    """Score the stage-3 prediction of the reference scan on the held-out annotated slice (side Dice);
    ``min_dice`` 0 always takes the refined masks, above 1 always the propagated ones. ``trained_on_it``
    (``slab_changed``): the models learned that slice, so its score proves nothing and propagation stands."""
    z = int(read_annotation_meta(layout)["seed_slice"])
    refined = clean_labels(reference_prediction, model_classes)[z]
    truth = read_array(layout.annotation)[z]
    score = mean_dice(
        to_class_space(refined, model_classes, 2), to_class_space(truth, annotation_classes, 2), 2
    )
    if trained_on_it:
        reason = "the models trained on the slice now held out (the annotation changed): retrain them"
        return RefinementDecision(float(score), min_dice, False, reason)
    return RefinementDecision(float(score), min_dice, bool(score >= min_dice))
