"""Supervoxel foreground sampling in the nnU-Net wrapper: the given patch centres replace nnU-Net's foreground
locations, moved as its preprocessing moves the case (here resampled from 1 mm to 2 mm in plane)."""

from __future__ import annotations

import pickle

import numpy as np

from nnsam2_assets.refinement import nnunet
from nnsam2_assets_tests.refinement.test_nnunet import CLASSES, _cases


def test_sampling_points_replace_the_foreground_locations_where_given(tmp_path):
    cases = _cases(tmp_path / "data", 3, spacing=(1.0, 1.0, 3.0))
    points = {1: np.array([[3, 20, 10], [5, 31, 13]])}
    profile = nnunet.get_profile("quick", num_epochs=1, iterations_per_epoch=2, val_iterations_per_epoch=1)
    info = nnunet.train_model(
        cases, CLASSES, False, tmp_path / "work", tmp_path / "model", profile, seed=1,
        sampling_points={cases[0].case_id: points, cases[1].case_id: None},
    )  # fmt: skip
    folder = next((tmp_path / "work" / "nnUNet_preprocessed").glob("Dataset*")) / "nnUNetPlans_2d"

    def locations(case) -> dict:
        pkl = folder / f"{info.case_ids[case.case_id]}.pkl"
        return pickle.loads(pkl.read_bytes())["class_locations"]

    first = locations(cases[0])
    # (z, y, x) at 1 mm -> 2 mm in plane: y and x halve, z stays; nnU-Net's leading channel index is 0
    assert first[1].tolist() == [[0, 3, 10, 5], [0, 5, 15, 6]]
    assert len(first[2]) > 2  # a class without points keeps nnU-Net's own locations
    assert len(locations(cases[1])[1]) > 2  # a case given None keeps nnU-Net's own draw
