"""Registration propagation backend: interface behaviour on synthetic volumes and accuracy on real Dixon MRI."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from nnsam2_assets.core.masks import clean_class_masks
from nnsam2_assets.propagation.backends import build_propagator
from nnsam2_assets.propagation.base import (
    CONFIDENCE_COLUMNS,
    PropagationResult,
    Propagator,
    target_seed_slice,
)
from nnsam2_assets.propagation.registration import RegistrationPropagator, ncc_window
from nnsam2_assets.testing.realdata import slice_annotation, tum_canonical

MERGE_4_TO_2 = np.array([0, 1, 1, 2, 2], dtype=np.uint8)


# ------------------------------------------------------------------------------------------------ synthetic
def _phantom(nz: int, ny: int, nx: int, spacing=(1.0, 1.0, 4.0), shift: float = 0.0, seed: int = 0):
    """Body ellipse with two pairs of 'muscles' (4 classes) drifting laterally with z; returns (image, labels)."""
    rng = np.random.default_rng(seed)
    zz, yy, xx = np.mgrid[0:nz, 0:ny, 0:nx].astype(np.float32)
    cy, cx = ny / 2, nx / 2 + shift
    img = np.where(((yy - cy) / (0.42 * ny)) ** 2 + ((xx - cx) / (0.45 * nx)) ** 2 < 1, 300.0, 20.0)
    lab = np.zeros((nz, ny, nx), np.uint8)
    for cls, dx, ry, rx in (
        (1, -0.22, 0.10, 0.09),
        (2, -0.08, 0.09, 0.05),
        (3, 0.08, 0.09, 0.05),
        (4, 0.22, 0.10, 0.09),
    ):
        wobble = 0.01 * nx * np.sin(zz / 3.0)
        inside = ((yy - (cy + 0.15 * ny)) / (ry * ny)) ** 2 + (
            (xx - (cx + dx * nx + wobble)) / (rx * nx)
        ) ** 2 < 1
        lab[inside] = cls
        img[inside] = 700.0 + 60.0 * cls
    img = img + rng.normal(0, 10, img.shape)
    image = sitk.GetImageFromArray(img.astype(np.float32))
    image.SetSpacing(spacing)
    return image, lab


def _annotation(labels: np.ndarray, z: int, like: sitk.Image, n_classes: int = 4) -> sitk.Image:
    arr = np.zeros_like(labels)
    arr[z] = labels[z] if n_classes == 4 else MERGE_4_TO_2[labels[z]]
    img = sitk.GetImageFromArray(arr)
    img.CopyInformation(like)
    return img


def test_target_seed_slice_keeps_relative_level():
    assert target_seed_slice(0, 29, 29) == 0
    assert target_seed_slice(28, 29, 29) == 28
    assert target_seed_slice(14, 29, 15) == 7
    assert target_seed_slice(9, 10, 19) == 18
    assert target_seed_slice(0, 1, 5) == 0  # one-slice reference: no division by zero


def test_registry_builds_registration_and_rejects_unknown():
    prop = build_propagator("registration")
    assert isinstance(prop, RegistrationPropagator) and isinstance(prop, Propagator)
    assert prop.backend == "registration" and prop.model_id
    with pytest.raises(ValueError):
        build_propagator("nope")


@pytest.mark.parametrize("n_classes", [4, 2])
def test_synthetic_propagation_both_directions(n_classes):
    ref, ref_lab = _phantom(7, 64, 72, spacing=(1.2, 1.2, 4.0))
    # Different size and spacing on the target: registration must work in physical space.
    tgt, tgt_lab = _phantom(9, 80, 80, spacing=(1.0, 1.0, 3.0), shift=3.0, seed=1)
    seed = 3
    res = RegistrationPropagator().propagate(
        ref, _annotation(ref_lab, seed, ref, n_classes), seed, tgt, "mri"
    )
    assert isinstance(res, PropagationResult)
    assert res.masks.shape == sitk.GetArrayViewFromImage(tgt).shape and res.masks.dtype == np.uint8
    assert set(np.unique(res.masks)) <= set(range(n_classes + 1))
    df = res.confidence
    assert list(df.columns) == CONFIDENCE_COLUMNS
    assert len(df) == 9 * n_classes
    t_seed = target_seed_slice(seed, 7, 9)
    assert set(df["direction"]) == {"seed", "superior", "inferior"}
    assert (df.loc[df["slice"] > t_seed, "direction"] == "superior").all()
    assert (df.loc[df["slice"] < t_seed, "direction"] == "inferior").all()
    assert (df["distance"] == (df["slice"] - t_seed).abs()).all()
    assert df["confidence"].between(0, 1).all()
    assert (df.loc[~df["present"], "confidence"] == 0).all()
    assert (df["present"] == (df["area"] > 0)).all()
    # Every class is found on every slice, and the result resembles the phantom's own labels.
    assert df["present"].all()
    truth = tgt_lab if n_classes == 4 else MERGE_4_TO_2[tgt_lab]
    for c in range(1, n_classes + 1):
        p, t = res.masks == c, truth == c
        assert 2 * (p & t).sum() / (p.sum() + t.sum()) > 0.6
    # Areas in the table are the mask's own.
    row = df[(df["slice"] == t_seed) & (df["class_id"] == 1)].iloc[0]
    assert row["area"] == int((res.masks[t_seed] == 1).sum())


def test_empty_target_gives_absent_zero_confidence():
    ref, ref_lab = _phantom(5, 48, 48)
    empty = sitk.Image(48, 48, 5, sitk.sitkFloat32)
    res = RegistrationPropagator().propagate(ref, _annotation(ref_lab, 2, ref), 2, empty, "ct")
    assert res.masks.shape == (5, 48, 48) and not res.masks.any()
    assert len(res.confidence) == 5 * 4
    assert not res.confidence["present"].any()
    assert (res.confidence["confidence"] == 0).all()


def test_inputs_are_not_modified_ct():
    ref, ref_lab = _phantom(5, 48, 48)
    ref = ref * 3.0 - 1000.0  # HU-like range, beyond the registration window
    before = sitk.GetArrayFromImage(ref).copy()
    RegistrationPropagator().propagate(ref, _annotation(ref_lab, 2, ref), 2, ref, "ct")
    np.testing.assert_array_equal(sitk.GetArrayFromImage(ref), before)


def test_clean_class_masks_non_overlapping_largest_component_filled():
    lab = np.zeros((3, 20, 20), np.uint8)
    lab[:, 2:10, 2:10] = 1
    lab[:, 5, 5] = 0  # hole
    lab[1, 15:17, 15:17] = 1  # stray island
    lab[:, 12:18, 2:8] = 2
    out = clean_class_masks(lab, 2)
    assert out[1, 5, 5] == 1 and out[1, 16, 16] == 0
    assert (out[:, 12:18, 2:8] == 2).all()


def test_clean_class_masks_keeps_a_class_inside_another_whatever_the_ids():
    for outer, inner in ((1, 2), (2, 1)):
        lab = np.zeros((3, 20, 20), np.uint8)
        lab[:, 4:16, 2:14] = outer
        lab[:, 7:13, 5:11] = inner
        out = clean_class_masks(lab, 2)
        assert (out == inner).sum() == 3 * 36 and (out == outer).sum() == 3 * (144 - 36), (outer, inner)


def test_propagated_onto_itself_the_annotated_slice_is_the_annotation_exactly():
    ref, ref_lab = _phantom(7, 64, 72, spacing=(1.2, 1.2, 4.0))
    seed = 3
    drawn = ref_lab.copy()
    drawn[seed, 2, 2] = 1  # an island the annotator drew
    muscle = np.argwhere(drawn[seed] == 4)[len(np.argwhere(drawn[seed] == 4)) // 2]
    drawn[seed, muscle[0], muscle[1]] = 0  # and a one-pixel hole in a muscle
    res = RegistrationPropagator().propagate(ref, _annotation(drawn, seed, ref), seed, ref, "mri")
    np.testing.assert_array_equal(res.masks[seed], drawn[seed])


# ------------------------------------------------------------------------------------------------ real data
def _load(case: str) -> tuple[sitk.Image, np.ndarray]:
    water, labels = tum_canonical(case)
    return water, MERGE_4_TO_2[labels]


def _volume_dice(pred: np.ndarray, truth: np.ndarray, n_classes: int) -> float:
    vals = []
    for c in range(1, n_classes + 1):
        p, t = pred == c, truth == c
        vals.append(2.0 * (p & t).sum() / max(p.sum() + t.sum(), 1))
    return float(np.mean(vals))


def test_real_tum01_middle_slice_to_tum01_and_tum02():
    """Acceptance: TUM01's middle slice (2-class expert labels) propagates with mean volume Dice >= 0.85."""
    ref, ref_lab = _load("TUM01")
    seed = ref_lab.shape[0] // 2
    annotation = slice_annotation(ref_lab, seed, ref)
    prop = build_propagator("registration")  # default quality, built once for both targets
    for case in ("TUM01", "TUM02"):
        tgt, truth = (ref, ref_lab) if case == "TUM01" else _load(case)
        res = prop.propagate(ref, annotation, seed, tgt, "mri")
        dice = _volume_dice(res.masks, truth, 2)
        assert dice >= 0.85, f"{case}: 2-class volume Dice {dice:.3f}"
        df = res.confidence
        assert df["present"].all()
        # Confidence ranks slices: the seed level is among the most trusted, the far ends are below it.
        per_slice = df.groupby("slice")["confidence"].mean()
        assert per_slice.loc[seed] >= per_slice.quantile(0.8)
        assert isinstance(df, pd.DataFrame) and df["confidence"].between(0, 1).all()


def test_propagation_is_reproducible_run_to_run():
    """A rerun reproduces its masks exactly, so data versions do not change and nothing downstream reruns."""
    import SimpleITK as sitk

    from nnsam2_assets.demo.phantom import generate_cohort

    cohort = generate_cohort(3, seed=5)
    ref, tgt = cohort.members[0], cohort.members[1]
    z = ref.seed_slice_middle
    ann = np.zeros_like(ref.labels2)
    ann[z] = ref.labels2[z]
    annotation = sitk.GetImageFromArray(ann)
    annotation.CopyInformation(ref.images["water"])
    prop = RegistrationPropagator()
    first, second = (
        prop.propagate(ref.images["water"], annotation, z, tgt.images["water"], "mri") for _ in "ab"
    )
    assert np.array_equal(first.masks, second.masks)
    pd.testing.assert_frame_equal(first.confidence, second.confidence)


def test_the_confidence_window_is_square_in_mm_on_rectangular_pixels():
    """The window was sized from the column spacing alone: on 0.5 x 1 mm pixels it spanned 2.5 times the
    setting along the rows. Square pixels keep the window they had."""
    assert ncc_window((1.0, 1.0), 15.0) == (15, 15)
    assert ncc_window((0.5, 1.0), 15.0) == (15, 31)  # rows of 1 mm, columns of 0.5 mm
    assert ncc_window((4.0, 4.0), 4.0) == (3, 3)  # never below 3
