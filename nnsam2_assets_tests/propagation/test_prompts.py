"""More than one annotated slice: each target slice from the nearest annotated level."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from nnsam2_assets.propagation.prompts import nearest_prompt, propagate_from_slices
from nnsam2_assets.propagation.registration import RegistrationPropagator
from nnsam2_assets_tests.propagation.test_registration import _phantom


def test_nearest_prompt_by_target_level_ties_to_the_lower_slice():
    np.testing.assert_array_equal(nearest_prompt([2], 9, 5), [2] * 5)
    # reference 9 slices, target 9: levels equal the prompts; slice 4 is 2 from both 2 and 6 -> 2
    np.testing.assert_array_equal(nearest_prompt([6, 2], 9, 9), [2, 2, 2, 2, 2, 6, 6, 6, 6])
    # target 5 slices: prompt 0 -> level 0, prompt 8 -> level 4
    np.testing.assert_array_equal(nearest_prompt([0, 8], 9, 5), [0, 0, 0, 8, 8])


def test_each_slice_comes_from_its_nearest_prompt_and_says_so():
    reference, labels = _phantom(9, 64, 72)
    annotation_arr = np.zeros_like(labels)
    annotation_arr[[1, 7]] = labels[[1, 7]]
    annotation = sitk.GetImageFromArray(annotation_arr)
    annotation.CopyInformation(reference)
    backend = RegistrationPropagator()
    both = propagate_from_slices(backend, reference, annotation, [7, 1], reference, "mri")
    # onto the reference itself: each annotated slice is its own annotation
    np.testing.assert_array_equal(both.masks[[1, 7]], labels[[1, 7]])
    table = both.confidence
    per_slice = table.groupby("slice").prompt_slice.first()
    np.testing.assert_array_equal(per_slice.to_numpy(), [1, 1, 1, 1, 1, 7, 7, 7, 7])
    assert (table.distance == (table.slice - table.prompt_slice).abs()).all()
    # the lower half is exactly what the lower prompt alone gives
    one = np.zeros_like(labels)
    one[1] = labels[1]
    single_ann = sitk.GetImageFromArray(one)
    single_ann.CopyInformation(reference)
    single = propagate_from_slices(backend, reference, single_ann, [1], reference, "mri")
    np.testing.assert_array_equal(both.masks[:5], single.masks[:5])
    assert (single.confidence.prompt_slice == 1).all()
