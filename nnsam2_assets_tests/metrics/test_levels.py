"""Per-level metrics: the L4/L5 split of the region, checked against a phantom's per-level truth."""

import numpy as np
import pytest

from nnsam2_assets.core.labels import class_map
from nnsam2_assets.demo.phantom import generate_phantom
from nnsam2_assets.metrics.quant import LEVEL_SEGMENTS, level_slices, quantify, quantify_levels


def test_the_segments_partition_the_region_and_the_l4_l5_slice_goes_to_the_upper_one():
    parts = level_slices(13, 6)
    assert parts == {LEVEL_SEGMENTS[0]: range(6, 13), LEVEL_SEGMENTS[1]: range(0, 6)}
    with pytest.raises(ValueError, match="must lie strictly inside"):
        level_slices(13, 0)


def test_level_volumes_add_up_and_match_the_phantoms_per_level_truth():
    phantom = generate_phantom(seed=3)
    lo, hi = phantom.region
    labels = phantom.labels[lo : hi + 1]
    water = phantom.clean["water"][lo : hi + 1]
    fat = phantom.clean["fat"][lo : hi + 1]
    split = phantom.disc_slices["L4/L5"] - lo
    levels = quantify_levels(labels, class_map(4), split, "p", water=water, fat=fat, spacing=phantom.spacing)
    whole = quantify(labels, class_map(4), "p", water=water, fat=fat, spacing=phantom.spacing)
    assert len(levels) == 2 * 4
    summed = levels.groupby("label").volume_ml.sum()
    np.testing.assert_allclose(summed.to_numpy(), whole.set_index("label").volume_ml.to_numpy(), rtol=1e-12)
    # truth from the generator: its L4/L5 disc slice and above is the upper segment
    voxel_ml = float(np.prod(phantom.spacing)) / 1000.0
    is_upper = np.arange(lo, hi + 1) >= phantom.disc_slices["L4/L5"]
    assert abs(phantom.level_t[phantom.disc_slices["L4/L5"]] - 0.5) <= 0.5 / (hi - lo)  # the nearest slice
    for label in class_map(4):
        upper = float((labels[is_upper] == label).sum()) * voxel_ml
        lower = float((labels[~is_upper] == label).sum()) * voxel_ml
        got = levels.set_index(["level", "label"]).volume_ml
        assert got[(LEVEL_SEGMENTS[0], label)] == pytest.approx(upper, rel=0.05)
        assert got[(LEVEL_SEGMENTS[1], label)] == pytest.approx(lower, rel=0.05)
    # mean CSA x slices x thickness is the volume; fat ratio of a segment lies between the two extremes
    row = levels.iloc[0]
    assert row.mean_csa_mm2 * row.n_slices * phantom.spacing[2] / 1000 == pytest.approx(row.volume_ml)
    assert levels.fat_ratio.between(0.0, 1.0).all()
