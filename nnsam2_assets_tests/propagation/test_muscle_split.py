"""The caudal multifidus share: sides untouched, the interface moved the anatomy's way, and on the real pair
a better 4-class result than the reference's flat share."""

from __future__ import annotations

import dataclasses

import numpy as np
import SimpleITK as sitk

from nnsam2_assets.core.labels import mean_dice, merge_sides
from nnsam2_assets.propagation.base import target_seed_slice
from nnsam2_assets.propagation.muscle_split import apply_caudal_share, caudal_mm_per_slice
from nnsam2_assets.propagation.registration import RegistrationPropagator, RegistrationSettings
from nnsam2_assets.testing.realdata import slice_annotation, tum_canonical

RIGHT_ES, RIGHT_MF, LEFT_MF, LEFT_ES = 1, 2, 3, 4


def _sides(n_slices: int = 9) -> np.ndarray:
    """Two 20x24 sides per slice, each a third multifidus (medial) and two thirds erector spinae."""
    lab = np.zeros((n_slices, 40, 64), dtype=np.uint8)
    lab[:, 10:30, 4:24] = RIGHT_ES
    lab[:, 10:30, 24:32] = RIGHT_MF
    lab[:, 10:30, 32:40] = LEFT_MF
    lab[:, 10:30, 40:60] = LEFT_ES
    return lab


def _share(lab: np.ndarray, mf: int, es: int) -> np.ndarray:
    return np.array([(s == mf).sum() / np.isin(s, (mf, es)).sum() for s in lab])


def test_the_share_rises_caudally_and_the_sides_stay():
    lab = _sides()
    # z runs towards the head (canonical LPS): caudal of the seed is a lower z
    out = apply_caudal_share(lab, seed_slice=4, caudal_mm=-4.0, slope_per_mm=0.02)
    assert np.array_equal(merge_sides(out), merge_sides(lab))
    assert np.array_equal(out[4], lab[4])
    for mf, es in ((RIGHT_MF, RIGHT_ES), (LEFT_MF, LEFT_ES)):
        share = _share(out, mf, es)
        assert np.all(np.diff(share) < 0), share  # falls from the feet towards the head
        # 8 of 28 columns, logit -0.916; four slices of 4 mm at 0.02 per mm move it by 0.32 either way
        expected = 1 / (1 + np.exp(-(np.log(8 / 20) + np.array([0.32, -0.32]))))
        assert np.allclose(share[[0, -1]], expected, atol=0.01), (share, expected)  # about 0.36 and 0.22
        # the multifidus grows from its own interface, not somewhere else in the side
        assert (out[0][lab[0] == mf] == mf).all()


def test_no_slope_or_no_multifidus_changes_nothing():
    lab = _sides()
    assert np.array_equal(apply_caudal_share(lab, 4, -4.0, 0.0), lab)
    no_mf = np.where(lab == RIGHT_MF, RIGHT_ES, lab)
    out = apply_caudal_share(no_mf, 4, -4.0, 0.02)
    assert not (out == RIGHT_MF).any()  # nothing to move on that side
    assert (out == LEFT_MF).sum() != (no_mf == LEFT_MF).sum()


def test_caudal_direction_comes_from_the_image_geometry():
    img = sitk.Image(4, 4, 6, sitk.sitkUInt8)
    img.SetSpacing((1.0, 1.0, 3.5))
    assert caudal_mm_per_slice(sitk.DICOMOrient(img, "LPS")) == -3.5
    assert caudal_mm_per_slice(sitk.DICOMOrient(img, "LPI")) == 3.5


def test_the_registration_backend_applies_it_to_four_classes_only():
    from nnsam2_assets.demo.phantom import generate_cohort

    cohort = generate_cohort(2, seed=3)
    ref, tgt = cohort.members[0], cohort.members[1]
    z = ref.seed_slice_middle
    flat = dataclasses.replace(RegistrationSettings(), caudal_share_slope_per_mm=0.0)
    results = {}
    for name, labels in (("4", ref.labels), ("2", ref.labels2)):
        ann = np.zeros_like(labels)
        ann[z] = labels[z]
        annotation = sitk.GetImageFromArray(ann)
        annotation.CopyInformation(ref.images["water"])
        for settings in (RegistrationSettings(), flat):
            prop = RegistrationPropagator(settings=settings)
            results[name, settings.caudal_share_slope_per_mm] = prop.propagate(
                ref.images["water"], annotation, z, tgt.images["water"], "mri"
            ).masks
    with_prior, without = results["4", RegistrationSettings().caudal_share_slope_per_mm], results["4", 0.0]
    assert not np.array_equal(with_prior, without)
    assert np.array_equal(merge_sides(with_prior), merge_sides(without))
    assert np.array_equal(results["2", RegistrationSettings().caudal_share_slope_per_mm], results["2", 0.0])


def test_real_pair_four_class_dice_gains_and_the_share_follows_the_expert():
    """TUM01's middle slice propagated to TUM02 with the reference's flat share, then the caudal share: the
    4-class Dice rises (0.718 -> 0.743 when measured) and each side's multifidus share is larger at the
    inferior end than at the superior end, as in the expert's labels, while the sides stay the same voxels."""

    ref, ref_lab = tum_canonical("TUM01")
    tgt, truth = tum_canonical("TUM02")
    seed = ref_lab.shape[0] // 2
    annotation = slice_annotation(ref_lab, seed, ref)
    flat = RegistrationPropagator(
        settings=dataclasses.replace(RegistrationSettings(), caudal_share_slope_per_mm=0)
    )
    carried = flat.propagate(ref, annotation, seed, tgt, "mri").masks
    t_seed = target_seed_slice(seed, ref_lab.shape[0], truth.shape[0])
    shifted = apply_caudal_share(carried, t_seed, caudal_mm_per_slice(tgt))
    assert np.array_equal(merge_sides(shifted), merge_sides(carried))
    gain = mean_dice(shifted, truth, 4) - mean_dice(carried, truth, 4)
    assert gain > 0.01, f"4-class Dice gain {gain:.4f}"
    for mf, es in ((RIGHT_MF, RIGHT_ES), (LEFT_MF, LEFT_ES)):
        share = _share(shifted, mf, es)
        expert = _share(truth, mf, es)
        assert share[:5].mean() > share[-5:].mean() + 0.1  # z runs to the head: slices 0-4 are inferior
        assert expert[:5].mean() > expert[-5:].mean()
