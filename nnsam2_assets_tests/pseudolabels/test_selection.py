import numpy as np
import pandas as pd
import pytest

from nnsam2_assets.core.labels import ignore_label
from nnsam2_assets.pseudolabels.selection import (
    SelectionConfig,
    area_smooth,
    pseudo_label_volume,
    select_slices,
    slice_table,
)


def test_area_smoothness_superior_direction_and_its_mirror():
    areas = np.array([100, 110, 300, 310, 320], dtype=float)  # a jump between z=1 and z=2
    sup = area_smooth(areas, 1.5, "superior")
    assert sup.tolist() == [True, False, True, True, True]  # growth towards superior flagged at its source
    # flipping z and using the opposite anatomical direction gives the mirrored answer
    inf = area_smooth(areas[::-1], 1.5, "inferior")
    assert inf[::-1].tolist() == sup.tolist()
    both = area_smooth(areas, 1.5, "both")
    assert both.tolist() == [True, False, False, True, True]
    assert area_smooth(areas[::-1], 1.5, "both")[::-1].tolist() == both.tolist()


def test_area_smoothness_shrinking_is_caught_in_both_mode_only():
    areas = np.array([300, 100, 100], dtype=float)
    assert area_smooth(areas, 1.5, "superior").all()  # the reference's one-directional rule misses it
    assert area_smooth(areas, 1.5, "both").tolist() == [False, False, True]


def test_area_smoothness_per_class():
    areas = np.array([[100, 100], [105, 400]], dtype=float)
    assert area_smooth(areas, 1.5, "both").tolist() == [False, False]


def _confidence(n: int, values: list[float], n_classes: int = 2) -> pd.DataFrame:
    rows = []
    for z in range(n):
        for c in range(1, n_classes + 1):
            rows.append(
                {
                    "slice": z,
                    "class_id": c,
                    "confidence": values[z],
                    "present": True,
                    "distance": abs(z - n // 2),
                }
            )
    return pd.DataFrame(rows)


def _masks(n: int) -> np.ndarray:
    m = np.zeros((n, 10, 10), np.uint8)
    m[:, 2:6, 1:4] = 1
    m[:, 2:6, 6:9] = 2
    return m


def test_ignore_volume_is_full_size_with_ignore_elsewhere():
    masks = _masks(8)
    vol = pseudo_label_volume(masks, [2, 5], 2)
    assert vol.shape == masks.shape
    assert ignore_label(2) == 3
    assert (vol[[0, 1, 3, 4, 6, 7]] == 3).all()
    assert np.array_equal(vol[[2, 5]], masks[[2, 5]])


def test_banded_selection_covers_every_level_while_global_bunches_at_the_seed():
    n = 20
    conf = [1.0 - abs(z - 10) / 20 for z in range(n)]  # confidence falls with distance from the seed
    cfg_b = SelectionConfig(top_fraction=0.1, mode="banded", n_bands=5)
    cfg_g = SelectionConfig(top_fraction=0.1, mode="global", n_bands=5)
    tables = [slice_table("d", f"s{i}", _masks(n), _confidence(n, conf), 2, cfg_b) for i in range(3)]
    table = pd.concat(tables, ignore_index=True)
    banded = select_slices(table, cfg_b)
    glob = select_slices(table, SelectionConfig(top_fraction=0.1, mode="global"))
    assert set(banded[banded.kept].band) == {0, 1, 2, 3, 4}
    # global: one best slice per level, and the extra top-10 % slices all sit at the seed level
    per_level = glob[glob.kept].groupby("slice").size()
    assert set(per_level.index) == set(range(n))
    assert set(per_level[per_level > 1].index) <= set(range(8, 13))
    assert banded.kept.sum() >= 5
    with pytest.raises(ValueError, match="unknown selection mode"):
        select_slices(table, SelectionConfig(mode="nope"))
    assert cfg_g.mode == "global"


def test_absent_or_implausible_slices_are_never_kept():
    n = 10
    masks = _masks(n)
    masks[4] = 0  # empty slice
    masks[7, :, :] = 0
    masks[7, 0:10, 0:5] = 1  # sudden huge right side, left missing
    conf = _confidence(n, [0.9] * n)
    conf.loc[conf.slice == 4, "present"] = False
    table = select_slices(
        slice_table("d", "s", masks, conf, 2, SelectionConfig()), SelectionConfig(top_fraction=1.0)
    )
    assert not table.loc[table.slice.isin([4, 7]), "kept"].any()
    assert table.kept.sum() > 0


def test_every_scan_contributes_its_minimum_of_slices_spread_over_bands():
    n = 20
    strong = [1.0 - abs(z - 10) / 20 for z in range(n)]
    weak = [0.5 * c for c in strong]  # a second scan whose slices all rank below the first scan's
    cfg = SelectionConfig(top_fraction=0.1, mode="banded", n_bands=5, min_per_scan=3)
    table = pd.concat(
        [
            slice_table("d", "strong", _masks(n), _confidence(n, strong), 2, cfg),
            slice_table("d", "weak", _masks(n), _confidence(n, weak), 2, cfg),
        ],
        ignore_index=True,
    )
    without = select_slices(table, SelectionConfig(top_fraction=0.1, mode="banded", min_per_scan=0))
    assert without[without.scan == "weak"].kept.sum() == 0  # the dataset-wide cut alone starves it
    kept = select_slices(table, cfg)
    weak_kept = kept[(kept.scan == "weak") & kept.kept]
    assert len(weak_kept) == 3
    assert weak_kept.band.nunique() == 3  # one per band before any band gets a second slice
    assert kept[kept.scan == "strong"].kept.sum() == without[without.scan == "strong"].kept.sum()
