"""Supervoxels, Dagster-free: SLIC on a slice, the registration chain carrying labels through a scan, the
patch centres the stage trainings take from them, the torchvision-free automatic mask generator (RANDOM SAM2
weights: plumbing, not masks) and the slice proposal of ``nnsam2 propose``."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from nnsam2_assets.propagation.slice_registration import carry_slice_labels
from nnsam2_assets.supervoxels import segments, steps
from nnsam2_assets.supervoxels.automatic import AutomaticMaskGenerator, box_nms
from nnsam2_assets.testing.cohorts import two_blob_annotation, two_blob_volume

SAM_SIZE = 64


def _image(arr: np.ndarray, spacing=(1.0, 1.0, 4.0)) -> sitk.Image:
    img = sitk.GetImageFromArray(arr.astype(np.float32))
    img.SetSpacing(spacing)
    return img


def test_slic_cuts_only_the_region_into_numbered_segments():
    vol = two_blob_volume(3)
    grey = (vol[1] - vol.min()) / (vol.max() - vol.min())
    region = np.zeros(grey.shape, bool)
    region[8:56, 4:60] = True
    labels = segments.slic_segments(grey, (1.0, 1.0), region)
    n = int(labels.max())
    assert segments.MIN_SEGMENTS <= n <= segments.MAX_SEGMENTS
    assert set(np.unique(labels)) == set(range(n + 1))  # 1..n, none missing
    assert not labels[~region].any() and labels[region].all()
    # a bright blob and the dark background never share a segment (intensity drives the cut)
    bright = vol[1] > 200
    mixed = [k for k in range(1, n + 1) if 0.2 < bright[labels == k].mean() < 0.8]
    assert len(mixed) <= n // 5
    assert segments.slic_segments(grey, (1.0, 1.0), np.zeros_like(region)).max() == 0


def test_carried_labels_follow_the_drifting_blobs():
    vol = two_blob_volume(9)
    seed = 4
    ann = two_blob_annotation(vol, seed)[seed].astype(np.uint16)
    ann[ann == 2] = 7  # any label values survive: warped by nearest neighbour, never renumbered
    carried = carry_slice_labels(_image(vol), ann, seed, "mri")
    assert carried.dtype == np.uint16 and carried.shape == vol.shape
    assert np.array_equal(carried[seed], ann)
    for z in (0, 2, 6, 8):
        bright = vol[z] > 200
        right = bright & (np.arange(64) < 32)[None, :]
        for label, side in ((1, right), (7, bright & ~right)):
            got = carried[z] == label
            dice = 2 * (got & side).sum() / (got.sum() + side.sum())
            assert dice > 0.85, (z, label, dice)
    assert not carry_slice_labels(_image(vol), np.zeros_like(ann), seed, "mri").any()


def test_sampling_points_are_one_per_supervoxel_and_slice_with_its_foreground_class():
    labels = np.zeros((3, 20, 20), np.uint8)
    labels[:, 2:10, 2:10] = 1
    labels[:, 2:10, 12:18] = 2
    labels[2] = 3  # an ignored slice
    supervoxels = np.zeros_like(labels, np.uint16)
    supervoxels[:, 0:12, 0:11] = 5  # a border segment: class 1 on 64 of its 132 pixels
    supervoxels[:, 2:10, 11:19] = 6  # mostly class 2
    supervoxels[:, 12:20, :] = 9  # background only: no patch centre
    supervoxels[:, 10:12, 11:20] = 4  # 2 of its 18 pixels muscle: below the share, no patch centre
    labels[:, 11, 11:13] = 2
    points = steps.sampling_points(supervoxels, labels, ignore_label=3)
    assert sorted(points) == [1, 2]
    for label, segment in ((1, 5), (2, 6)):
        zyx = points[label]
        assert zyx.shape == (2, 3) and sorted(zyx[:, 0]) == [0, 1]  # slices 0 and 1, never the ignored one
        assert all(supervoxels[z, y, x] == segment for z, y, x in zyx)  # inside its own supervoxel
        assert all(labels[z, y, x] == label for z, y, x in zyx)  # and a pixel of its own class


def test_a_point_is_a_pixel_of_its_class_even_where_the_supervoxel_centre_is_not():
    """nnU-Net takes a class's points for that class's pixels; a supervoxel 40 % muscle on one side had filed
    its centre, a background pixel, under the muscle."""
    labels = np.zeros((1, 10, 10), np.uint8)
    labels[0, :, :4] = 1
    supervoxels = np.ones_like(labels, np.uint16)
    (point,) = steps.sampling_points(supervoxels, labels, ignore_label=None)[1]
    assert labels[tuple(point)] == 1 and tuple(point) in {(0, 4, 3), (0, 5, 3)}


def test_box_nms_keeps_the_best_of_overlapping_boxes():
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30]], dtype=torch.float32)
    kept = box_nms(boxes, torch.tensor([0.5, 0.9, 0.7]), 0.7)
    assert kept.tolist() == [1, 2]


def test_torchvision_is_not_installed_and_the_generator_never_needs_it():
    assert importlib.util.find_spec("torchvision") is None
    code = "import torchvision"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode != 0
    import nnsam2_assets.supervoxels.automatic  # noqa: F401

    assert "torchvision" not in sys.modules


@pytest.fixture(scope="module")
def random_generator() -> AutomaticMaskGenerator:
    torch.manual_seed(0)
    return AutomaticMaskGenerator(image_size=SAM_SIZE, device="cpu", allow_random_weights=True,
                                  points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0)  # fmt: skip


def test_random_weights_are_refused_unless_asked_for():
    with pytest.raises(ValueError, match="RANDOM"):
        AutomaticMaskGenerator(image_size=SAM_SIZE, device="cpu")


def test_default_thresholds_keep_nothing_with_random_weights(random_generator):
    strict = AutomaticMaskGenerator.__new__(AutomaticMaskGenerator)
    strict.__dict__.update(random_generator.__dict__)
    strict.pred_iou_thresh, strict.stability_score_thresh = 0.92, 0.95
    grey = np.clip((two_blob_volume(1)[0] - 80) / 240, 0, 1)
    assert strict.generate(grey) == []


def test_sam2_supervoxels_reach_the_sampling_locations(random_generator, tmp_path):
    """SAM2 path with random weights and zero thresholds: masks are meaningless, the plumbing is real."""
    from nnsam2_assets.propagation.sam2 import SAM2Propagator

    vol = two_blob_volume(5)
    grey = np.clip((vol[2] - 80) / 240, 0, 1)
    candidates = random_generator.generate(grey)
    assert candidates and all(c.mask.shape == grey.shape for c in candidates)
    assert [c.predicted_iou for c in candidates] == sorted(
        (c.predicted_iou for c in candidates), reverse=True
    )
    propagator = SAM2Propagator(image_size=SAM_SIZE, allow_random_weights=True, device="cpu", threads=1)
    method = steps.sam2_method(random_generator, propagator, propagator.model_id)
    assert method.name == "sam2" and method.model_id.count("random") == 2
    labels = np.stack([two_blob_annotation(vol, z)[z] for z in range(vol.shape[0])])
    scan = _image(vol, spacing=(2.0, 2.0, 4.0))  # the region margin (10 mm) is 5 pixels here
    seed_labels = steps.seed_segments(method, scan, "mri", 2, near=labels[2] > 0)
    assert (
        seed_labels.max() >= 1
        and not seed_labels[segments.region_around(labels[2] > 0, (2.0, 2.0)) == 0].any()
    )
    supervoxels = method.carry(scan, seed_labels, 2, "mri")
    assert supervoxels.shape == vol.shape and np.array_equal(supervoxels[2], seed_labels)
    points = steps.sampling_points(supervoxels, labels, ignore_label=3)
    assert sum(len(p) for p in points.values()) >= 1
    # a seed slice where no mask passed the thresholds (real weights, a low-contrast slice): no supervoxel,
    # as SLIC's chain carries an empty cut; the propagator had refused the empty prompt and failed the dataset
    nothing = method.carry(scan, np.zeros_like(seed_labels), 2, "mri")
    assert nothing.shape == vol.shape and not nothing.any()


def test_the_sam2_supervoxels_load_sam2_once_and_cut_with_the_propagators_model(tmp_path, monkeypatch):
    """The house rule "load models once per run": the mask generator runs on the video predictor's encoder and
    decoders (a SAM2Base of the same config and checkpoint) instead of building a second model."""
    from nnsam2_assets.core import sam2_models
    from nnsam2_assets.propagation import sam2 as sam2_backend
    from nnsam2_assets.propagation.settings import PropagationConfig

    torch.manual_seed(0)
    saved = sam2_backend.SAM2Propagator(
        image_size=SAM_SIZE, allow_random_weights=True, device="cpu", threads=1
    )
    checkpoint = tmp_path / "tiny.pt"
    torch.save({"model": saved.predictor.state_dict()}, checkpoint)

    def second_build(*args, **kwargs):
        raise AssertionError("a second SAM2 model was built")

    monkeypatch.setattr(sam2_models, "build_image_model", second_build)
    before = sam2_backend.MODEL_BUILDS
    config = PropagationConfig(sam2_checkpoint=str(checkpoint), sam2_image_size=SAM_SIZE, device="cpu")
    method = steps.method_for(config)
    assert sam2_backend.MODEL_BUILDS - before == 1
    assert method.name == "sam2" and "random" not in method.model_id

    vol = two_blob_volume(5)
    labels = two_blob_annotation(vol, 2)[2]
    scan = _image(vol, spacing=(2.0, 2.0, 4.0))
    seed_labels = steps.seed_segments(method, scan, "mri", 2, near=labels > 0)
    assert seed_labels.shape == labels.shape
    assert method.carry(scan, labels, 2, "mri").shape == vol.shape
    assert sam2_backend.MODEL_BUILDS - before == 1
