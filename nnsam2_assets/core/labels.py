"""The label facts, stated once: class names and ids, the side merge, the ignore label, and Dice.

Class ids are 1-based positions in the class tuples. Left and right are distinct classes; nothing in the
pipeline mirrors an image or a label, so a flip can never swap their meaning.

Dice's empty-mask rule: two empty masks agree perfectly (Dice 1.0). Mean-slice Dice, a summary over the
slices of a volume, skips the class-slices that are empty in both masks instead, so slices outside the
muscles' extent do not inflate it (see ``slice_dice``).
"""

from __future__ import annotations

from collections.abc import Collection

import numpy as np

CLASSES_4 = ("right_es", "right_mf", "left_mf", "left_es")
CLASSES_2 = ("right_lpm", "left_lpm")
# 4-class id -> 2-class id: right LPM = right ES + right MF, left LPM = left MF + left ES
SIDE_MERGE = {1: 1, 2: 1, 3: 2, 4: 2}
# TotalSegmentator's ids (task "total") of our 2-class classes: autochthon right / left (ES + MF together)
TOTALSEG_LPM_IDS = {1: 87, 2: 86}

# Coded concepts of the classes for DICOM Segmentation objects: (scheme, code value, meaning).
# Erector spinae: SNOMED CT, DICOM CID 6116 (Muscular Anatomy). Multifidus is in no DICOM context group; its
# SNOMED CT body structure is taken from the SNOMED CT body-site value set that FHIR publishes. The 2-class
# paraspinal group: SNOMED CT "Deep muscle of back", as TotalSegmentator codes its autochthon (ES + MF).
ANATOMICAL_STRUCTURE = ("SCT", "91723000", "Anatomical Structure")
MUSCLE_CODES = {
    "es": ("SCT", "44947003", "Erector spinae muscle"),
    "mf": ("SCT", "5709001", "Multifidus muscles"),
    "lpm": ("SCT", "244849004", "Deep muscle of back"),
}
LATERALITY_CODES = {"right": ("SCT", "24028007", "Right"), "left": ("SCT", "7771000", "Left")}


def segment_codes(class_name: str) -> tuple[tuple[str, str, str], tuple[str, str, str]]:
    """(property type, laterality modifier) of a class, e.g. right_es -> erector spinae, right."""
    side, muscle = class_name.split("_", 1)
    return MUSCLE_CODES[muscle], LATERALITY_CODES[side]


def class_names(n_classes: int) -> tuple[str, ...]:
    """The class names of a 4-class or 2-class scheme, in id order (id = position + 1)."""
    if n_classes not in (2, 4):
        raise ValueError(f"{n_classes} classes: the schemes are 4-class {CLASSES_4} or 2-class {CLASSES_2}")
    return CLASSES_4 if n_classes == 4 else CLASSES_2


def class_map(n_classes: int) -> dict[int, str]:
    """{class id: class name} of a scheme."""
    return {i + 1: name for i, name in enumerate(class_names(n_classes))}


def side_of(class_name: str) -> str:
    return "right" if class_name.startswith("right") else "left"


def ignore_label(n_classes: int) -> int:
    """nnU-Net's ignore label: the value after the last class."""
    return n_classes + 1


def to_class_space(
    labels: np.ndarray, from_classes: int, to_classes: int, ignore: bool = False
) -> np.ndarray:
    """Labels of one scheme in another: identity, or the 4-class -> 2-class side merge.

    ``ignore`` carries the ignore label along (4-class 5 -> 2-class 3); otherwise it becomes background, as
    do ids outside the scheme.
    """
    if from_classes == to_classes:
        mapping = {c: c for c in range(1, from_classes + 1)}
    elif (from_classes, to_classes) == (4, 2):
        mapping = dict(SIDE_MERGE)
    else:
        raise ValueError(f"cannot convert {from_classes}-class labels to {to_classes} classes")
    if ignore:
        mapping[ignore_label(from_classes)] = ignore_label(to_classes)
    lut = np.zeros(256, dtype=np.uint8)
    for src, dst in mapping.items():
        lut[src] = dst
    values = np.asarray(labels)
    if values.dtype == np.uint8:
        return lut[values]
    # a wider integer type: an id outside 0..255 must not wrap onto a class (256 -> 0, 257 -> 1)
    in_range = (values >= 0) & (values <= 255)
    return np.where(in_range, lut[np.where(in_range, values, 0).astype(np.uint8)], 0).astype(np.uint8)


def side_ids(n_classes: int, side: str) -> tuple[int, ...]:
    """The class ids of one side ("right" or "left") in a scheme."""
    return tuple(i for i, name in class_map(n_classes).items() if side_of(name) == side)


def merge_sides(labels: np.ndarray) -> np.ndarray:
    """4-class ES/MF per side -> 2-class right/left LPM."""
    return to_class_space(labels, 4, 2)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two boolean masks; 1.0 when both are empty (perfect agreement on absence)."""
    a = np.asarray(a, dtype=bool)
    b = np.asarray(b, dtype=bool)
    total = int(np.count_nonzero(a)) + int(np.count_nonzero(b))
    if total == 0:
        return 1.0
    return 2.0 * int(np.count_nonzero(a & b)) / total


def dice_per_class(a: np.ndarray, b: np.ndarray, n_classes: int) -> list[float]:
    """Dice of each class id 1..n_classes between two label arrays (any shape)."""
    return [dice(a == c, b == c) for c in range(1, n_classes + 1)]


def mean_dice(a: np.ndarray, b: np.ndarray, n_classes: int, skip: Collection[int] = ()) -> float:
    """Mean over classes of the per-class Dice (volume Dice when given volumes); the classes in ``skip`` (an
    expert's ``unannotated_classes``) are left out, and with none left it is NaN."""
    scores = [d for c, d in enumerate(dice_per_class(a, b, n_classes), start=1) if c not in skip]
    return float(np.mean(scores)) if scores else float("nan")


def unannotated_classes(expert: np.ndarray, k: int) -> dict[int, set[int]]:
    """The classes a scan's expert labels (``k`` classes) leave out, per class scheme of its metrics (``k``, and
    2 for a 4-class scan): a muscle the expert did not draw is not annotated, not absent, so its comparison
    must not read a volume of 0; a side is not annotated when one of its muscles is not."""
    present = set(np.unique(expert).tolist())
    missing = {c for c in range(1, k + 1) if c not in present}
    out = {k: missing}
    if k == 4:
        out[2] = {int(to_class_space(np.array([c], np.uint8), 4, 2)[0]) for c in missing}
    return out


def slice_dice(pred: np.ndarray, truth: np.ndarray, n_classes: int) -> np.ndarray:
    """Per axial slice of [z, y, x] volumes: mean Dice over the classes present in either slice.

    Class-slices empty in both are skipped; a slice where every class is empty in both is NaN.
    """
    out = np.full(pred.shape[0], np.nan)
    for z in range(pred.shape[0]):
        scores = [
            dice(pred[z] == c, truth[z] == c)
            for c in range(1, n_classes + 1)
            if (pred[z] == c).any() or (truth[z] == c).any()
        ]
        if scores:
            out[z] = float(np.mean(scores))
    return out


def mean_slice_dice(pred: np.ndarray, truth: np.ndarray, n_classes: int) -> float:
    """Mean of ``slice_dice`` over the slices where any class is present (NaN when none is)."""
    scores = slice_dice(pred, truth, n_classes)
    return float(np.nanmean(scores)) if np.isfinite(scores).any() else float("nan")
