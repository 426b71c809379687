import numpy as np
import pandas as pd

from nnsam2_assets.refinement.rules import STAGE_RULES, select_stage_cases, slice_agreement, volume_smooth


def _labels(n: int = 4) -> np.ndarray:
    a = np.zeros((n, 8, 8), np.uint8)
    a[:, 1:4, 1:3] = 1
    a[:, 1:4, 5:7] = 2
    return a


def test_agreeing_slices_keeps_slices_above_the_threshold():
    a = _labels()
    b = a.copy()
    b[:2] = 0
    b[:2, 1:3, 1:2], b[:2, 1:3, 5:6] = 1, 2  # the two lower slices disagree
    assert slice_agreement(a, b, 2, 0.85)[0].tolist() == [False, False, True, True]


def test_agreeing_slices_relaxes_to_the_better_half_instead_of_all_ignore():
    a = _labels()
    b = np.zeros_like(a)
    b[:, 1:3, 1:2], b[:, 1:3, 5:6] = 1, 2
    b[3] = a[3]  # one slice agrees better than the others, none reaches 0.999
    kept = slice_agreement(a, b, 2, 0.999)[0]
    assert kept.any() and kept[3]
    assert not slice_agreement(a, np.zeros_like(a), 2, 0.85)[0].any()  # nothing to compare: nothing kept


def _masks(n: int) -> np.ndarray:
    m = np.zeros((n, 10, 10), np.uint8)
    m[:, 2:6, 1:4] = 1
    m[:, 2:6, 6:9] = 2
    return m


def test_volume_smoothness_ignores_empty_caps():
    m = _masks(6)
    m[0] = 0
    m[5] = 0
    assert volume_smooth(m, 2, 1.5)
    m[3, :, :] = 0
    m[3, 0:9, 0:4] = 1
    assert not volume_smooth(m, 2, 1.5)


def test_stage_selection_thresholds_and_relaxation():
    rows = pd.DataFrame(
        {
            "dataset": ["a"] * 5 + ["b"] * 3,
            "scan": [f"s{i}" for i in range(8)],
            "mean_dice": [0.97, 0.96, 0.91, 0.80, 0.99, 0.85, 0.70, 0.88],
            "smooth_ok": [True, True, True, True, False, True, True, True],
        }
    )
    s2 = select_stage_cases(rows, STAGE_RULES["stage2"])
    a = s2[s2.dataset == "a"]
    assert set(a.scan[a.selected]) == {"s0", "s1", "s2"}  # > 0.90 and smooth (s4 fails smoothness)
    assert not a.relaxed.any()
    b = s2[s2.dataset == "b"]
    assert b.relaxed.all() and set(b.scan[b.selected]) == {"s7", "s5"}  # best two by agreement
    s3 = select_stage_cases(rows, STAGE_RULES["stage3"])
    a3 = s3[s3.dataset == "a"]
    assert set(a3.scan[a3.selected]) == {"s0", "s1"}  # > 0.95, top 20 % but at least 2
