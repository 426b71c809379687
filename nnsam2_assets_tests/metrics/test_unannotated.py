"""A class that a scan's expert labels leave out is not annotated: its comparison with the expert is unknown,
never the final mask against a volume of 0."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import SimpleITK as sitk

from nnsam2_assets.core.layout import DatasetLayout
from nnsam2_assets.core.storage import atomic_write_image
from nnsam2_assets.metrics.steps import _scan_rows, unannotated_classes


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
