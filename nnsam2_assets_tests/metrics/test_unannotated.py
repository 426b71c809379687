"""A class that a scan's expert labels leave out is not annotated: its comparison with the expert is unknown,
never the final mask against a volume of 0."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import SimpleITK as sitk

from nnsam2_assets.core.labels import unannotated_classes
from nnsam2_assets.core.layout import DatasetLayout
from nnsam2_assets.core.storage import atomic_write_image
from nnsam2_assets.metrics.steps import _scan_rows


def _image(arr: np.ndarray) -> sitk.Image:
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((1.0, 1.0, 4.0))
    return img


def test_unannotated_classes_per_scheme():
    expert = np.zeros((2, 4, 4), np.uint8)
    expert[0, 0, :3] = [1, 2, 4]  # no left multifidus (3)
    assert unannotated_classes(expert, 4) == {4: {3}, 2: {2}}  # and so no left side
    assert unannotated_classes(np.array([[[1, 2]]], np.uint8), 2) == {2: set()}


def test_a_class_the_expert_left_out_has_no_expert_numbers_but_keeps_its_own(tmp_path: Path):
    mask = np.zeros((3, 12, 12), np.uint8)
    for c, x in zip((1, 2, 3, 4), (1, 4, 7, 10), strict=True):
        mask[:, 2:8, x : x + 2] = c
    expert = mask.copy()
    expert[expert == 3] = 0  # the expert drew every muscle but the left multifidus
    layout = DatasetLayout(tmp_path, "ds")
    atomic_write_image(_image(np.full(mask.shape, 100.0, np.float32)), layout.scan_image("s1"))
    atomic_write_image(_image(expert), layout.scan_expert("s1"))
    spec = SimpleNamespace(modality="mri", is_dixon=False, n_classes=4)

    labels, slices, _ = _scan_rows(spec, layout, "s1", 4, _image(mask), None)

    four = labels[labels.scheme == "4-class"].set_index("label")
    assert np.isnan(four.loc[3, ["dice", "expert_volume_ml"]].astype(float)).all()
    assert four.loc[3, "volume_ml"] > 0  # the final mask's own numbers stay
    assert (four.loc[[1, 2, 4], "dice"] == 1.0).all()
    assert (four.loc[[1, 2, 4], "expert_volume_ml"] == four.loc[[1, 2, 4], "volume_ml"]).all()
    two = labels[labels.scheme == "2-class"].set_index("label")
    assert (
        np.isnan(two.loc[2, "expert_volume_ml"]) and two.loc[1, "dice"] == 1.0
    )  # the left side's sum is partial
    assert slices[slices.label == 3].dice.isna().all() and (slices[slices.label == 1].dice == 1.0).all()


def test_the_propagation_and_pseudo_label_diagnostics_leave_an_unannotated_side_out(tmp_path: Path):
    """The propagated masks' and the pseudo-label slices' expert Dice counted a side the expert did not draw
    as Dice 0: masks equal to the expert's right side scored 0.5, where the metrics say 1.0."""
    import pandas as pd

    from nnsam2_assets.propagation.steps import _mask_summary
    from nnsam2_assets.pseudolabels.selection import SelectionConfig
    from nnsam2_assets.pseudolabels.steps import _slice_tables

    masks = np.zeros((3, 12, 12), np.uint8)
    masks[:, 2:8, 1:5], masks[:, 2:8, 7:11] = 1, 2
    expert = np.where(masks == 1, 1, 0).astype(np.uint8)  # the right side only
    layout = DatasetLayout(tmp_path, "ds")
    atomic_write_image(_image(masks), layout.masks("s1"))
    atomic_write_image(_image(expert), layout.scan_expert("s1"))
    conf = pd.DataFrame(
        [{"slice": z, "class_id": c, "confidence": 0.9, "present": True} for z in range(3) for c in (1, 2)]
    ).assign(scan="s1", backend="registration", model_id="m")
    conf.to_parquet(layout.confidence("s1"))

    assert _mask_summary("s1", conf, masks, layout, 2)["expert_dice"] == 1.0
    spec = SimpleNamespace(name="ds", n_classes=2)
    (table,), _ = _slice_tables(spec, layout, SelectionConfig(), {"s1": "digest"})
    assert (table.expert_dice == 1.0).all()
    atomic_write_image(_image(np.zeros_like(masks)), layout.scan_expert("s1"))  # nothing drawn: unknown
    assert np.isnan(_mask_summary("s1", conf, masks, layout, 2)["expert_dice"])


def test_the_final_masks_expert_dice_leaves_an_unannotated_side_out(tmp_path: Path):
    """The final masks' table (and the asset's mean_expert_dice) scored a side the expert did not draw as 0."""
    from nnsam2_assets.refinement.final_masks import _agreement_row

    final = np.zeros((3, 12, 12), np.uint8)
    final[:, 2:8, 1:5], final[:, 2:8, 7:11] = 1, 2
    layout = DatasetLayout(tmp_path, "ds")
    atomic_write_image(_image(final), layout.final_mask_canonical("s1"))
    atomic_write_image(_image(np.where(final == 1, 1, 0).astype(np.uint8)), layout.scan_expert("s1"))
    row = _agreement_row(layout, "s1", (final, final, final), 2, final, 2, final, "refined", {})
    assert row["expert_dice"] == 1.0 and row["propagation_expert_dice"] == 1.0
