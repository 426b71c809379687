"""The caudal multifidus share: sides untouched, the interface moved the anatomy's way, and on the real pair
a better 4-class result than the reference's flat share."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from nnsam2_assets.core.labels import mean_dice, merge_sides
from nnsam2_assets.propagation.base import target_seed_slice
from nnsam2_assets.propagation.registration import RegistrationPropagator
from nnsam2_assets.refinement.final_masks import caudal_share_pivot
from nnsam2_assets.refinement.muscle_split import (
    apply_caudal_share,
    caudal_mm_per_slice,
    caudal_slope,
    ordered_split,
    split_slice,
)
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


def test_a_shrinking_multifidus_gives_up_its_interface_not_its_rim():
    """Ranked by their distance to anything outside the multifidus, its voxels next to the background (the
    lamina, the midline) had gone to the erector spinae first: a band of erector spinae wrapped round it."""
    lab = _sides()
    out = apply_caudal_share(lab, seed_slice=4, caudal_mm=-4.0, slope_per_mm=0.02)
    for z in range(5, 9):  # cranial of the seed: the share falls
        right, left = out[z][10:30, 4:32], out[z][10:30, 32:60]
        # each row is one run of multifidus on the midline and one of erector spinae laterally
        assert (right[:, -1] == RIGHT_MF).all() and (right[:, 0] == RIGHT_ES).all()
        assert (left[:, 0] == LEFT_MF).all() and (left[:, -1] == LEFT_ES).all()
        for row in right:
            assert (np.diff((row == RIGHT_MF).astype(int)) >= 0).all()  # ES ... ES MF ... MF
        for row in left:
            assert (np.diff((row == LEFT_MF).astype(int)) <= 0).all()  # MF ... MF ES ... ES
    assert _share(out, RIGHT_MF, RIGHT_ES)[-1] < _share(lab, RIGHT_MF, RIGHT_ES)[-1]


def test_a_side_slice_all_multifidus_gains_no_erector_spinae():
    """Its share, clipped to 0.98 for the slope fit, had been moved from 0.98: erector spinae appeared on a
    slice that had none, though the share was to rise."""
    lab = _sides(40)
    lab[0][lab[0] == RIGHT_ES] = RIGHT_MF  # the most caudal right side all multifidus
    assert 0 < caudal_slope(lab, "right", -3.0) < 0.015  # the one slice does not make the fitted rise enough
    out = apply_caudal_share(lab, seed_slice=20, caudal_mm=-3.0, slope_per_mm=0.015)
    assert (out[1] == RIGHT_MF).sum() > (lab[1] == RIGHT_MF).sum()  # the rise was applied to that side
    assert np.array_equal(out[0][lab[0] > 0] == RIGHT_MF, lab[0][lab[0] > 0] == RIGHT_MF)


def test_no_slope_or_no_multifidus_changes_nothing():
    lab = _sides()
    assert np.array_equal(apply_caudal_share(lab, 4, -4.0, 0.0), lab)
    no_mf = np.where(lab == RIGHT_MF, RIGHT_ES, lab)
    out = apply_caudal_share(no_mf, 4, -4.0, 0.02)
    assert not (out == RIGHT_MF).any()  # nothing to move on that side
    assert (out == LEFT_MF).sum() != (no_mf == LEFT_MF).sum()


def test_the_split_inside_the_side_box_is_the_full_slice_split():
    rng = np.random.default_rng(0)
    for _ in range(20):
        side = np.zeros((64, 80), dtype=bool)
        y, x = rng.integers(0, 40), rng.integers(0, 56)
        side[y : y + rng.integers(5, 24), x : x + rng.integers(5, 24)] = True
        side &= rng.random(side.shape) > 0.1  # ragged, with holes
        multifidus = side & (np.arange(80)[None, :] < x + rng.integers(1, 10))
        if not multifidus.any():
            continue
        share = float(rng.uniform(0.05, 0.95))
        full = ordered_split(side, multifidus, share)  # distances over the whole slice
        assert np.array_equal(split_slice(side, multifidus, share), full)
        assert abs(full.sum() - share * side.sum()) <= 0.5 and not (full & ~side).any()


def test_caudal_direction_comes_from_the_image_geometry():
    img = sitk.Image(4, 4, 6, sitk.sitkUInt8)
    img.SetSpacing((1.0, 1.0, 3.5))
    assert caudal_mm_per_slice(sitk.DICOMOrient(img, "LPS")) == -3.5
    assert caudal_mm_per_slice(sitk.DICOMOrient(img, "LPI")) == 3.5


def _rising(slope_per_mm: float, n_slices: int = 9, seed: int = 4) -> np.ndarray:
    """Two 100-column sides whose multifidus share has logit -1 at the seed and rises caudally at the given
    slope (z runs to the head, 4 mm per slice)."""
    lab = np.zeros((n_slices, 6, 210), dtype=np.uint8)
    for z in range(n_slices):
        share = 1 / (1 + np.exp(-(-1 + slope_per_mm * 4.0 * (seed - z))))
        k = int(round(100 * share))
        lab[z, :, : 100 - k], lab[z, :, 100 - k : 100] = RIGHT_ES, RIGHT_MF
        lab[z, :, 110 : 110 + k], lab[z, :, 110 + k :] = LEFT_MF, LEFT_ES
    return lab


def test_a_share_that_already_rises_fast_enough_is_left_alone():
    lab = _rising(0.03)
    assert caudal_slope(lab, "right", -4.0) > 0.025
    assert np.array_equal(apply_caudal_share(lab, 4, -4.0, 0.015), lab)


def test_a_milder_rise_gets_only_what_is_missing():
    lab = _rising(0.005)
    out = apply_caudal_share(lab, 4, -4.0, 0.015)
    for side in ("right", "left"):
        assert abs(caudal_slope(lab, side, -4.0) - 0.005) < 0.002
        assert abs(caudal_slope(out, side, -4.0) - 0.015) < 0.002
    assert np.array_equal(merge_sides(out), merge_sides(lab))


def test_only_a_four_class_dataset_annotated_on_one_slice_gets_it():
    assert caudal_share_pivot((14,), 4) == 14
    assert caudal_share_pivot((14,), 2) is None  # no muscles inside the sides
    assert caudal_share_pivot((4, 14, 24), 4) is None  # the annotated levels carry their own splits


def test_real_pair_four_class_dice_gains_and_the_share_follows_the_expert():
    """TUM01's middle slice propagated to TUM02 keeps the reference's flat share; the caudal share raises the
    4-class Dice (0.718 -> 0.740 when measured) and makes each side's multifidus share larger at the inferior
    end than at the superior end, as in the expert's labels, while the sides stay the same voxels."""
    ref, ref_lab = tum_canonical("TUM01")
    tgt, truth = tum_canonical("TUM02")
    seed = ref_lab.shape[0] // 2
    carried = (
        RegistrationPropagator().propagate(ref, slice_annotation(ref_lab, seed, ref), seed, tgt, "mri").masks
    )
    caudal = caudal_mm_per_slice(tgt)
    shifted = apply_caudal_share(carried, target_seed_slice(seed, ref_lab.shape[0], truth.shape[0]), caudal)
    assert np.array_equal(merge_sides(shifted), merge_sides(carried))
    gain = mean_dice(shifted, truth, 4) - mean_dice(carried, truth, 4)
    assert gain > 0.01, f"4-class Dice gain {gain:.4f}"
    for side, (mf, es) in (("right", (RIGHT_MF, RIGHT_ES)), ("left", (LEFT_MF, LEFT_ES))):
        assert caudal_slope(carried, side, caudal) < 0.01  # the carrier's share is nearly flat
        assert caudal_slope(truth, side, caudal) > 0.015  # the expert's rises
        assert caudal_slope(shifted, side, caudal) > 0.013
        share = _share(shifted, mf, es)
        assert share[:5].mean() > share[-5:].mean() + 0.1  # z runs to the head: slices 0-4 are inferior
