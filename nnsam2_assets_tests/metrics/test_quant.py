"""Quantification: MANIFEST golden values on the real TUM Dixon labels and the TotalSegmentator CT, plus
small synthetic checks of units, unclipped HU, Dixon pairing, Dice and the per-slice table."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from nnsam2_assets.core.imaging import read_image
from nnsam2_assets.metrics import quant
from nnsam2_assets.testing.realdata import TS, TUM, TUM_LABEL_MAP, shared_file

# the shared data's MANIFEST.md: (volume mL, fat ratio as region sum) per label.
TUM_GOLDEN = {
    "TUM01": {1: (203.1240, 0.14568), 2: (63.7136, 0.16007), 3: (69.5891, 0.13822), 4: (191.0411, 0.13585)},
    "TUM02": {1: (150.1034, 0.16229), 2: (81.3774, 0.16264), 3: (76.8795, 0.16719), 4: (175.8917, 0.16884)},
}


@pytest.mark.parametrize("case", sorted(TUM_GOLDEN))
def test_tum_manual_labels_reproduce_manifest(case: str) -> None:
    water, fat = read_image(shared_file(TUM / f"{case}_water.nii.gz")), read_image(TUM / f"{case}_fat.nii.gz")
    quant.check_dixon_pair(water, fat, f"{case}_water", f"{case}_fat")
    labels = sitk.ReadImage(str(TUM / f"{case}_label_watergrid.nii.gz"))
    df = quant.quantify(labels, TUM_LABEL_MAP, case, water=water, fat=fat, expert=labels)
    assert list(df.columns) == quant.QUANT_COLUMNS
    assert list(df["label"]) == [1, 2, 3, 4]
    for _, row in df.iterrows():
        vol, fr = TUM_GOLDEN[case][row["label"]]
        assert row["volume_ml"] == pytest.approx(vol, abs=0.01)
        assert row["fat_ratio"] == pytest.approx(fr, abs=1e-4)
        # voxel-wise mean F/(F+W) is a different (smaller here) quantity, reported separately
        assert row["fat_fraction_mean"] < row["fat_ratio"]
        assert row["dice"] == 1.0
    assert df["ct_mean_hu"].isna().all()
    if case == "TUM01":  # docs/method.md: 0.1457 as region sum but 0.1321 as voxel-wise mean
        assert df.loc[0, "fat_fraction_mean"] == pytest.approx(0.1321, abs=1e-4)

    per_slice = quant.quantify_per_slice(labels, TUM_LABEL_MAP, case, water=water, fat=fat)
    assert list(per_slice.columns) == quant.SLICE_COLUMNS
    assert len(per_slice) == 4 * 29
    # CSA summed over slices × slice thickness reproduces the volume
    vol_from_csa = per_slice.groupby("label")["area_mm2"].sum() * labels.GetSpacing()[2] / 1000
    np.testing.assert_allclose(vol_from_csa.to_numpy(), df["volume_ml"].to_numpy(), rtol=1e-9)
    assert per_slice["fat_ratio"].between(0, 1).all()


def test_ct_autochthon_mean_hu() -> None:
    ct = sitk.ReadImage(str(shared_file(TS / "example_ct_sm.nii.gz")))
    seg = sitk.ReadImage(str(TS / "example_ct_sm_seg_total.nii.gz"))
    df = quant.quantify(seg, {87: "right_lpm", 86: "left_lpm"}, "example_ct_sm", ct=ct).set_index("label")
    assert df.loc[86, "n_voxels"] == 7050 and df.loc[87, "n_voxels"] == 6635
    assert df.loc[86, "ct_mean_hu"] == pytest.approx(25.67, abs=0.01)
    assert df.loc[87, "ct_mean_hu"] == pytest.approx(23.33, abs=0.01)
    assert df.loc[86, "volume_ml"] == pytest.approx(7050 * 27 / 1000)
    # the muscle-range column drops out-of-range voxels and so counts fewer of them
    assert (df["ct_n_voxels_muscle"] < df["n_voxels"]).all()
    assert df["fat_ratio"].isna().all() and df["dice"].isna().all()


def test_ct_stats_are_unclipped() -> None:
    mask = np.zeros((2, 3, 3), np.uint8)
    mask[0, 0, :3] = 1
    ct = np.zeros(mask.shape, np.int16)
    ct[0, 0, :3] = [-100, 50, 1000]  # fat, muscle, bone: only 50 is in -29..150
    df = quant.quantify(mask, {1: "right_lpm", 2: "left_lpm"}, "s", ct=ct, spacing=(2.0, 1.0, 5.0))
    r1, r2 = df.iloc[0], df.iloc[1]
    assert r1["ct_mean_hu"] == pytest.approx(950 / 3)
    assert r1["ct_median_hu"] == 50
    assert r1["ct_sd_hu"] == pytest.approx(np.std([-100, 50, 1000], ddof=1))
    assert r1["ct_mean_hu_muscle"] == 50 and r1["ct_n_voxels_muscle"] == 1
    assert r1["volume_ml"] == pytest.approx(3 * 10 / 1000)
    assert r2["n_voxels"] == 0 and r2["volume_ml"] == 0 and np.isnan(r2["ct_mean_hu"])


def test_array_mask_needs_spacing_and_matching_shapes() -> None:
    mask = np.ones((2, 2, 2), np.uint8)
    with pytest.raises(quant.QuantError, match="spacing"):
        quant.quantify(mask, {1: "a"})
    with pytest.raises(quant.QuantError, match="ct array shape"):
        quant.quantify(mask, {1: "a"}, ct=np.zeros((2, 2, 3)), spacing=(1, 1, 1))
    with pytest.raises(quant.QuantError, match="both water and fat"):
        quant.quantify(mask, {1: "a"}, water=np.ones((2, 2, 2)), spacing=(1, 1, 1))


def test_dixon_pairing_by_array_index() -> None:
    w = sitk.GetImageFromArray(np.full((2, 4, 4), 3.0))
    f = sitk.GetImageFromArray(np.full((2, 4, 4), 1.0))
    f.SetOrigin((-204.5, -147.9, 192.8))  # different origin, as in the real export: still pairs
    m = sitk.GetImageFromArray(np.ones((2, 4, 4), np.uint8))
    df = quant.quantify(m, {1: "x"}, water=w, fat=f)
    assert df.loc[0, "fat_ratio"] == pytest.approx(0.25) and df.loc[0, "fat_fraction_mean"] == pytest.approx(
        0.25
    )

    f_bad = sitk.GetImageFromArray(np.ones((2, 4, 4)))
    f_bad.SetSpacing((1.5, 1.0, 1.0))
    with pytest.raises(quant.QuantError, match=r"fat.nii.gz spacing .* water w.nii.gz"):
        quant.check_dixon_pair(w, f_bad, "w.nii.gz", "fat.nii.gz")
    with pytest.raises(quant.QuantError, match=r"f.nii.gz shape .* water w.nii.gz"):
        quant.check_dixon_pair(w, sitk.GetImageFromArray(np.ones((3, 4, 4))), "w.nii.gz", "f.nii.gz")


def test_fat_ratio_sum_vs_voxel_mean() -> None:
    fat, water, region = np.array([90.0, 1.0]), np.array([10.0, 99.0]), np.array([True, True])
    assert quant.fat_ratio(fat, water, region) == pytest.approx(91 / 200)
    assert quant.fat_fraction_mean(fat, water, region) == pytest.approx((0.9 + 0.01) / 2)
    assert np.isnan(quant.fat_ratio(fat, water, np.array([False, False])))
    per_slice = quant.fat_ratio_of_sums(np.array([1.0, 0.0]), np.array([3.0, 0.0]))
    assert per_slice[0] == pytest.approx(0.25) and np.isnan(per_slice[1])


def test_per_slice_uses_axial_axis_of_image() -> None:
    # Array [z,y,x] = (3, 4, 5) but the direction maps index axis i (x) to S-I: slices run along numpy axis 2.
    arr = np.zeros((3, 4, 5), np.uint8)
    arr[:, :, 1] = 1  # one full i-slice (3×4 voxels) of label 1
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((5.0, 2.0, 1.5))
    img.SetDirection((0, 1, 0, 0, 0, 1, 1, 0, 0))  # row-major: physical z (row 2) <- index i (column 0)
    ct = sitk.GetImageFromArray(np.full(arr.shape, 40, np.int16))
    ct.CopyInformation(img)
    ps = quant.quantify_per_slice(img, {1: "right_lpm"}, "s", ct=ct, expert=img)
    assert len(ps) == 5 and list(ps["n_voxels"]) == [0, 12, 0, 0, 0]
    assert ps.loc[1, "area_mm2"] == pytest.approx(12 * 2.0 * 1.5)
    assert ps.loc[1, "ct_mean_hu"] == 40 and np.isnan(ps.loc[0, "ct_mean_hu"])
    assert (ps["dice"] == 1.0).all() and ps["fat_ratio"].isna().all()
