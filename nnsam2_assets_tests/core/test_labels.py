import numpy as np
import pytest

from nnsam2_assets.core.labels import (
    class_map,
    class_names,
    dice,
    dice_per_class,
    mean_slice_dice,
    merge_sides,
    slice_dice,
    to_class_space,
)


def test_dice_and_its_empty_mask_rule() -> None:
    assert dice(np.zeros(4, bool), np.zeros(4, bool)) == 1.0
    assert dice(np.ones(4, bool), np.zeros(4, bool)) == 0.0
    assert dice(np.array([1, 1, 0, 0]), np.array([1, 0, 0, 0])) == pytest.approx(2 / 3)


def test_side_merge_keeps_sides_apart() -> None:
    expert = np.array([[[1, 2, 0, 3, 4]]], np.uint8)
    pred = np.array([[[2, 1, 0, 3, 4]]], np.uint8)  # ES/MF swapped on the right: sides still perfect
    np.testing.assert_array_equal(merge_sides(expert), [[[1, 1, 0, 2, 2]]])
    assert dice_per_class(pred, expert, 4) == [0.0, 0.0, 1.0, 1.0]
    assert dice_per_class(merge_sides(pred), merge_sides(expert), 2) == [1.0, 1.0]
    assert to_class_space(np.array([0, 1, 2, 3, 4, 5], np.uint8), 4, 2, ignore=True).tolist() == [
        0,
        1,
        1,
        2,
        2,
        3,
    ]
    assert class_names(2) == ("right_lpm", "left_lpm") and class_map(4)[4] == "left_es"
    with pytest.raises(ValueError, match="2-class"):
        class_names(3)


def test_mean_slice_dice_skips_class_slices_empty_in_both() -> None:
    truth = np.zeros((3, 2, 4), np.uint8)
    truth[0, :, :2], truth[0, :, 2:] = 1, 2  # both classes
    truth[1, :, :2] = 1  # class 2 absent in both: skipped, not counted as 1.0
    pred = truth.copy()
    pred[1, 0, :2] = 0  # half of class 1 missed on slice 1
    scores = slice_dice(pred, truth, 2)
    assert scores[0] == 1.0 and scores[1] == pytest.approx(2 / 3) and np.isnan(scores[2])
    assert mean_slice_dice(pred, truth, 2) == pytest.approx((1.0 + 2 / 3) / 2)
    assert np.isnan(mean_slice_dice(np.zeros_like(truth), np.zeros_like(truth), 2))
