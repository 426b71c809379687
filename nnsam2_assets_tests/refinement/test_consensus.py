"""The final masks' consensus: refined labels kept only where the propagated mask has the same side, and its
edges then placed on the scan's image."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from nnsam2_assets.core.labels import mean_dice, to_class_space
from nnsam2_assets.refinement.final_masks import compose_final, consensus, refined_final
from nnsam2_assets.refinement.finishing import finish_refined


def _square(shape: tuple[int, int, int], value: int, x0: int, x1: int) -> np.ndarray:
    out = np.zeros(shape, np.uint8)
    out[:, 4:12, x0:x1] = value
    return out


def test_a_voxel_is_kept_only_where_both_call_it_the_same_side():
    shape = (3, 16, 32)
    refined = _square(shape, 1, 2, 14) + _square(shape, 2, 18, 30)  # 2-class: right 2..13, left 18..29
    propagated = _square(shape, 1, 4, 16) + _square(shape, 2, 16, 28)  # shifted: each edge disagrees
    out = consensus(refined, 2, propagated, 2)
    assert set(np.unique(out)) == {0, 1, 2}
    assert (out[:, 4:12, 4:14] == 1).all() and (out[:, 4:12, 18:28] == 2).all()  # both agree
    assert not out[:, :, :4].any() and not out[:, :, 28:].any()  # claimed by the refined mask alone
    assert not out[:, :, 14:18].any()  # propagation alone, or sides that disagree
    assert (out > 0).sum() == ((refined > 0) & (propagated > 0)).sum()


def test_4_class_refined_labels_keep_their_muscles_inside_a_2_class_or_4_class_propagation():
    shape = (2, 16, 32)
    # 4-class: right ES 1 and right MF 2 on the right side; left MF 3 and left ES 4 on the left
    refined = _square(shape, 1, 2, 8) + _square(shape, 2, 8, 14) + _square(shape, 3, 18, 24)
    refined += _square(shape, 4, 24, 30)
    # the propagation puts the ES/MF interface elsewhere: only the sides count
    propagated4 = _square(shape, 1, 2, 11) + _square(shape, 2, 11, 14) + _square(shape, 3, 18, 27)
    propagated4 += _square(shape, 4, 27, 30)
    out = consensus(refined, 4, propagated4, 4)
    assert np.array_equal(out, refined)
    out2 = consensus(refined, 4, to_class_space(propagated4, 4, 2), 2)
    assert np.array_equal(out2, refined)
    # a propagation with the sides swapped leaves nothing
    swapped = to_class_space(propagated4, 4, 2)
    swapped = np.where(swapped == 1, 2, np.where(swapped == 2, 1, 0)).astype(np.uint8)
    assert not consensus(refined, 4, swapped, 2).any()


def test_the_consensus_edges_are_placed_on_the_image_where_the_two_masks_cross():
    # two bright muscles on a dark background, 1 mm pixels (the edge band is 4 px); the refined mask is shifted
    # 3 px one way and the propagated one 3 px the other, so their consensus is 6 px too narrow per side
    rng = np.random.default_rng(0)
    shape = (3, 40, 64)
    truth = np.zeros(shape, np.uint8)
    truth[:, 10:30, 6:26], truth[:, 10:30, 38:58] = 1, 2
    pixels = np.where(truth > 0, 1000.0, 200.0) + rng.normal(0, 20, shape)
    image = sitk.GetImageFromArray(pixels.astype(np.float32))
    refined, propagated = np.roll(truth, 3, axis=2), np.roll(truth, -3, axis=2)
    bare = consensus(refined, 2, propagated, 2)
    # the refined mask as it comes in, already finished: its edges are where the image puts them
    final = refined_final(finish_refined(refined, image, "t1w", 2), 2, propagated, 2, image, "t1w")
    assert mean_dice(bare, truth, 2) < 0.85
    assert mean_dice(final, truth, 2) > 0.97
    # the image decides only within the edge band: nothing beyond it is claimed
    assert not final[:, :, :2].any() and not final[:, :, 62:].any()


def test_the_final_mask_is_the_refined_consensus_split_into_the_datasets_own_classes_or_the_propagation():
    # a 4-class dataset in a 2-class pool: the refined sides, cut to the propagated ones, carry the propagated
    # ES/MF interface; with the propagated masks chosen, the final mask is the cleaned propagation itself
    rng = np.random.default_rng(1)
    shape = (3, 40, 64)
    propagated = np.zeros(shape, np.uint8)
    propagated[:, 10:30, 6:16], propagated[:, 10:30, 16:26] = 1, 2  # right ES, right MF
    propagated[:, 10:30, 38:48], propagated[:, 10:30, 48:58] = 3, 4  # left MF, left ES
    pixels = np.where(propagated > 0, 1000.0, 200.0) + rng.normal(0, 20, shape)
    image = sitk.GetImageFromArray(pixels.astype(np.float32))
    prediction = to_class_space(propagated, 4, 2)
    prediction[:, 10:30, 30:34] = 1  # a right-side claim across the midline, which propagation does not make

    finished = finish_refined(prediction, image, "t1w", 2)
    refined = compose_final(finished, 2, propagated, 4, image, "t1w", None)
    assert set(np.unique(refined)) == {0, 1, 2, 3, 4}
    assert not refined[:, :, 28:36].any()  # the claim only the prediction makes is not kept
    assert mean_dice(refined, propagated, 4) > 0.95

    kept = compose_final(None, 2, propagated, 4, image, "t1w", None)
    assert np.array_equal(kept, propagated)
    # the caudal multifidus share changes the ES/MF split only, never a side
    caudal = compose_final(finished, 2, propagated, 4, image, "t1w", 2)
    assert np.array_equal(to_class_space(caudal, 4, 2), to_class_space(refined, 4, 2))
    assert np.isin(caudal[0], (2, 3)).sum() > np.isin(refined[0], (2, 3)).sum()  # more multifidus caudally
