"""The held-out annotated slab: hidden from every stage's training, and the replace-or-keep decision on it."""

import json

import numpy as np
import SimpleITK as sitk

from nnsam2_assets.core.labels import ignore_label
from nnsam2_assets.core.layout import DatasetLayout
from nnsam2_assets.refinement.holdout import (
    MIN_HELDOUT_DICE,
    decide,
    exact_label_slices,
    held_out_slab,
)
from nnsam2_assets.refinement.pool import Pool
from nnsam2_assets.refinement.stage_labels import exact_and_held_out


def _write(arr: np.ndarray, path, spacing=(1.0, 1.0, 2.0)) -> None:
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path))


def _annotated_dataset(
    tmp_path, seed: int = 5, n: int = 11, spacing_z: float = 2.0, more: tuple[int, ...] = ()
) -> DatasetLayout:
    """A reference annotated on ``seed`` (the primary slice) and the slices in ``more``."""
    layout = DatasetLayout(tmp_path, "ds")
    _write(np.zeros((n, 40, 40), np.float32), layout.scan_image("ref"), (1.0, 1.0, spacing_z))
    annotation = np.zeros((n, 40, 40), np.uint8)
    for z in (seed, *more):
        annotation[z, 10:30, 5:15] = 1  # right LPM
        annotation[z, 10:30, 25:35] = 2  # left LPM
    _write(annotation, layout.annotation, (1.0, 1.0, spacing_z))
    meta = {"reference": "ref", "seed_slice": seed, "n_classes": 2, "annotated_slices": sorted((seed, *more))}
    layout.annotation_meta.write_text(json.dumps(meta))
    return layout


def test_the_slab_reaches_the_neighbours_within_its_half_width(tmp_path):
    slab = held_out_slab(_annotated_dataset(tmp_path, seed=5, spacing_z=2.0))
    assert (slab.scan, slab.seed_slice, slab.first, slab.last) == ("ref", 5, 3, 7)  # 4 mm at 2 mm slices
    edge = held_out_slab(_annotated_dataset(tmp_path / "edge", seed=0, spacing_z=5.0))
    assert (edge.first, edge.last) == (0, 0)  # slices thicker than the half-width: the seed alone


def test_every_stage_trains_without_the_reference_slab(tmp_path):
    layout = _annotated_dataset(tmp_path)
    pool = Pool(layouts={"ds": layout}, n_classes={"ds": 2}, scans={"ds": ["ref", "other"]})
    ignore = ignore_label(2)
    full = np.ones((11, 40, 40), np.uint8)
    labels = exact_and_held_out({("ds", "ref"): full, ("ds", "other"): full}, pool)
    assert (labels[("ds", "ref")][3:8] == ignore).all()
    assert (labels[("ds", "ref")][:3] == 1).all() and (labels[("ds", "ref")][8:] == 1).all()
    assert (labels[("ds", "other")] == 1).all()  # only the reference's annotated slab is held out
    assert (full == 1).all()  # the caller's arrays are not modified

    only_slab = np.full((11, 40, 40), ignore, np.uint8)
    only_slab[5] = 1
    assert ("ds", "ref") not in exact_and_held_out(
        {("ds", "ref"): only_slab}, pool
    )  # nothing left to learn from


def test_refined_masks_replace_propagation_only_when_they_reproduce_the_held_out_slice(tmp_path):
    layout = _annotated_dataset(tmp_path)
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(layout.annotation)))
    good = decide(truth, 2, layout, 2)
    assert good.use_refined and good.heldout_dice == 1.0 and good.source == "refined"

    shifted = np.roll(truth, 4, axis=2)  # both sides 4 of 10 columns off: Dice 0.6
    poor = decide(shifted, 2, layout, 2)
    assert not poor.use_refined and poor.source == "propagated"
    assert abs(poor.heldout_dice - 0.6) < 1e-6 and poor.min_heldout_dice == MIN_HELDOUT_DICE

    swapped = np.where(truth == 1, 2, np.where(truth == 2, 1, 0)).astype(np.uint8)
    assert decide(swapped, 2, layout, 2).heldout_dice == 0.0  # left and right are distinct labels


def test_a_4_class_model_is_judged_on_its_side_masks(tmp_path):
    layout = _annotated_dataset(tmp_path)
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(layout.annotation)))
    four = np.zeros_like(truth)
    four[truth == 1] = 1  # right ES
    four[:, 20:30][truth[:, 20:30] == 1] = 2  # right MF: the same right side
    four[truth == 2] = 4  # left ES
    assert decide(four, 4, layout, 2).heldout_dice == 1.0


def test_further_annotated_slices_are_exact_labels_of_every_stage(tmp_path):
    """The primary slice is held out; the others replace what a stage would learn there, and a reference the
    stage did not select still trains on them."""
    layout = _annotated_dataset(tmp_path, seed=5, more=(0, 10))
    assert exact_label_slices(layout) == {"ref": [0, 10]}
    pool = Pool(layouts={"ds": layout}, n_classes={"ds": 2}, scans={"ds": ["ref", "other"]})
    ignore = ignore_label(2)
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(layout.annotation)))
    wrong = np.full((11, 40, 40), 2, np.uint8)  # a stage's labels: everything left LPM
    labels = exact_and_held_out({("ds", "ref"): wrong, ("ds", "other"): wrong}, pool)
    ref = labels[("ds", "ref")]
    np.testing.assert_array_equal(ref[[0, 10]], truth[[0, 10]])
    assert (ref[3:8] == ignore).all() and (ref[1:3] == 2).all()
    assert (labels[("ds", "other")] == 2).all()

    unselected = exact_and_held_out({("ds", "other"): wrong}, pool)[("ds", "ref")]
    np.testing.assert_array_equal(unselected[[0, 10]], truth[[0, 10]])
    assert (np.delete(unselected, [0, 10], axis=0) == ignore).all()

    near = _annotated_dataset(tmp_path / "near", seed=5, more=(6,))
    assert exact_label_slices(near) == {}  # inside the held-out slab: held out with it


def test_the_slab_reaches_the_slice_at_its_half_width_whatever_the_spacing_precision():
    import numpy as np

    from nnsam2_assets.refinement.holdout import HOLDOUT_HALF_WIDTH_MM, slab_reach

    assert HOLDOUT_HALF_WIDTH_MM == 4.0
    for spacing, reach in ((0.5, 8), (0.8, 5), (1.0, 4), (2.0, 2), (2.5, 1), (4.0, 1), (5.0, 0)):
        assert slab_reach(float(np.float32(spacing))) == reach, spacing  # as a NIfTI header stores it
        assert slab_reach(spacing) == reach, spacing


def test_the_exact_label_lineage_lists_only_what_a_stage_trains_on(tmp_path, monkeypatch):
    from pathlib import Path

    from nnsam2_assets.refinement import stage_labels

    layout = _annotated_dataset(tmp_path, seed=5, more=(9,))  # slab 3..7: slice 9 is trained on
    corrections = [("ref", [4, 10], Path("c.nii.gz")), ("gone", [2], Path("g.nii.gz"))]
    real = stage_labels.exact_labels
    monkeypatch.setattr(stage_labels, "exact_labels", lambda lay: real(lay) + corrections)
    pool = Pool(layouts={"ds": layout}, n_classes={"ds": 2}, scans={"ds": ["ref", "other"]})
    # slice 4 lies in the held-out slab and "gone" left the dataset: neither is trained on
    assert stage_labels.exact_lineage(pool) == {"ds/ref": [9, 10]}


def test_models_that_trained_on_the_slice_now_held_out_are_neither_current_nor_trusted(tmp_path):
    """The annotation had slices 5 (primary) and 9; the user removed slice 5, so 9 is held out now. Every
    stage had trained on 9 as an exact label: scoring them there inflated the held-out Dice and could publish
    refined masks that had not earned it, and ``models_state`` still called the models current."""
    from nnsam2_assets.core.layout import model_pointer
    from nnsam2_assets.refinement.holdout import slab_changed
    from nnsam2_assets.refinement.models import STAGES, models_state
    from nnsam2_assets.testing.models import write_model_stub

    layout = _annotated_dataset(tmp_path, seed=5, more=(9,))
    write_model_stub(tmp_path / "model")
    pointer = {
        "version": "v1",
        "model_dir": str(tmp_path / "model"),
        "training_datasets": ["ds"],
        "held_out_slabs": {"ds": held_out_slab(layout).record()},
    }
    for stage in STAGES:
        model_pointer(tmp_path, stage).parent.mkdir(parents=True, exist_ok=True)
        model_pointer(tmp_path, stage).write_text(json.dumps(pointer))
    assert not slab_changed(pointer, "ds", held_out_slab(layout)) and models_state(tmp_path, ["ds"]).current

    _annotated_dataset(tmp_path, seed=9)  # slice 5 removed: 9 is the primary slice now
    assert slab_changed(pointer, "ds", held_out_slab(layout))
    state = models_state(tmp_path, ["ds"])
    assert not state.current and "ds" in state.reason and "held" in state.reason
    truth = np.zeros((11, 40, 40), np.uint8)
    truth[9, 10:30, 5:15], truth[9, 10:30, 25:35] = 1, 2
    decision = decide(truth, 2, layout, 2, trained_on_it=True)
    assert decision.heldout_dice == 1.0 and not decision.use_refined and "retrain" in decision.reason
    assert not slab_changed(
        {k: v for k, v in pointer.items() if k != "held_out_slabs"}, "ds", held_out_slab(layout)
    )
    # a reference that no longer ingests leaves the dataset out of the pool: nothing to judge, and no read of
    # the removed scan (models_state had failed on it)
    layout.scan_image("ref").unlink()
    assert not slab_changed(pointer, "ds", held_out_slab(layout))
    assert models_state(tmp_path, ["ds"]).current
