"""Side-edge refinement of propagated masks on the target's own image (random walker within a band)."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from nnsam2_assets.core.labels import mean_dice
from nnsam2_assets.core.walker import walk
from nnsam2_assets.propagation.boundary import BETA, band_key, refine_side_boundaries
from nnsam2_assets.propagation.registration import RegistrationPropagator

BAND = 4
# the walker's solver tolerance left probabilities a hair outside [0, 1] and scikit-image warned on the
# console of every run; the step silences that one warning, and any other library warning fails these tests
pytestmark = pytest.mark.filterwarnings("error::UserWarning")


def _two_muscles(ny: int = 80, nx: int = 120, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """One slice: two bright ellipses (right and left side; each split into ES lateral, MF medial) on a dark
    background with noise; returns (image in [0, 1], 4-class labels)."""
    yy, xx = np.mgrid[0:ny, 0:nx].astype(np.float32)
    labels = np.zeros((ny, nx), np.uint8)
    for cx, lateral, medial in ((0.25 * nx, 1, 2), (0.75 * nx, 4, 3)):  # 16 px apart, as a spinous process
        inside = ((yy - ny / 2) / 20) ** 2 + ((xx - cx) / 22) ** 2 < 1
        is_lateral = (xx < cx) if lateral == 1 else (xx > cx)
        labels[inside & is_lateral] = lateral
        labels[inside & ~is_lateral] = medial
    rng = np.random.default_rng(seed)
    image = np.where(labels > 0, 0.8, 0.15) + rng.normal(0, 0.03, labels.shape)
    return np.clip(image, 0, 1).astype(np.float32), labels


def _grow(labels: np.ndarray, pixels: float) -> np.ndarray:
    """Labels grown by ``pixels`` (Euclidean) into the background, each pixel taking its nearest class: a
    propagated edge that lags the image edge."""
    distance, (iy, ix) = ndimage.distance_transform_edt(labels == 0, return_indices=True)
    return np.where(distance <= pixels, labels[iy, ix], 0).astype(labels.dtype)


@pytest.mark.parametrize("n_classes", [2, 4])
def test_a_lagging_edge_moves_onto_the_image_edge(n_classes):
    image, truth4 = _two_muscles()
    truth = truth4 if n_classes == 4 else np.array([0, 1, 1, 2, 2], np.uint8)[truth4]
    lagging = _grow(truth, 3)[None]
    refined = refine_side_boundaries(lagging, image[None], n_classes, BAND)
    before, after = mean_dice(lagging[0], truth, n_classes), mean_dice(refined[0], truth, n_classes)
    assert before < 0.93 and after > 0.97, (before, after)
    # sides never change places: each class stays within the band of its own true extent
    for c in range(1, n_classes + 1):
        assert (refined[0] == c).sum() > 0
        assert (ndimage.distance_transform_edt(truth != c)[refined[0] == c] <= BAND).all()
    if n_classes == 4:
        inner = truth4 > 0
        np.testing.assert_array_equal(refined[0][inner], truth4[inner])


def test_on_rectangular_pixels_the_band_is_measured_in_mm_along_both_axes():
    """Rows twice as long as columns: the band had been counted in pixels of either axis, so the edge moved
    8 mm along the rows where the band is 4 mm, and a 1.2 x 0.6 mm scan got twice its band one way."""
    image, truth = _two_muscles()
    truth = np.array([0, 1, 1, 2, 2], np.uint8)[truth]
    lagging = _grow(truth, 3)  # 3 rows: 6 mm along y at 2 mm per row, beyond a 4 mm band
    refined = refine_side_boundaries(lagging[None], image[None], 2, BAND, aspect=2.0)[0]
    moved_out = (lagging > 0) & (refined == 0)
    assert moved_out.sum() > 0  # the edge still moves within its band
    depth_mm = ndimage.distance_transform_edt(lagging > 0, sampling=(2.0, 1.0))
    assert depth_mm[moved_out].max() <= BAND, depth_mm[moved_out].max()
    square = refine_side_boundaries(lagging[None], image[None], 2, BAND)[0]  # square pixels: as before
    assert ndimage.distance_transform_edt(lagging > 0)[(lagging > 0) & (square == 0)].max() == 3
    # the masks' cache keys: square pixels' cached masks stay current, rectangular ones' are made again
    assert band_key((1.019, 1.019, 4.0)) == "" and band_key((0.5, 1.0, 4.0)) != ""


def test_the_walker_weighs_intensity_steps_per_mm_on_rectangular_pixels(monkeypatch):
    """scikit-image's walker took every pixel step as one unit: on rows twice as long as columns an edge
    along the rows weighed twice what it does per mm. Square pixels walk exactly as before."""
    from nnsam2_assets.testing.spies import record_walker_spacing

    image, truth = _two_muscles()
    sides = _grow(np.array([0, 1, 1, 2, 2], np.uint8)[truth], 3)
    seen = record_walker_spacing(monkeypatch)
    refine_side_boundaries(sides[None], image[None], 2, BAND, aspect=2.0)
    assert seen == [(2.0, 1.0)]
    seeds = np.zeros(image.shape, np.int32)
    seeds[truth > 0], seeds[:, :3] = 2, 1
    within = np.ones(image.shape, bool)
    square = walk(image, seeds, BETA, within, spacing=(1.0, 1.0))
    np.testing.assert_array_equal(square, walk(image, seeds, BETA, within))


def test_kept_slices_band_zero_and_empty_slices_are_untouched():
    image, truth = _two_muscles()
    lagging = np.stack([_grow(truth, 3), _grow(truth, 3), np.zeros_like(truth)])
    images = np.stack([image, image, image])
    out = refine_side_boundaries(lagging, images, 4, BAND, keep_slices={0})
    np.testing.assert_array_equal(out[0], lagging[0])
    assert not np.array_equal(out[1], lagging[1])
    assert not out[2].any()
    np.testing.assert_array_equal(refine_side_boundaries(lagging, images, 4, 0), lagging)


def test_a_side_thinner_than_the_band_is_left_as_propagated():
    image, truth = _two_muscles()
    thin = np.zeros_like(truth)
    thin[38:42, 20:60] = 1  # 4 px thick: erosion by the band leaves no interior to seed it
    thin[30:50, 70:100] = 2
    out = refine_side_boundaries(thin[None], image[None], 2, BAND)
    np.testing.assert_array_equal(out[0], thin)


def test_propagating_onto_the_reference_keeps_its_annotated_slice_exactly():
    image, truth = _two_muscles()
    volume = np.stack([image * (1 + 0.02 * k) for k in range(5)]) * 1000
    reference = sitk.GetImageFromArray(volume.astype(np.float32))
    reference.SetSpacing((1.0, 1.0, 4.0))
    annotation_arr = np.zeros(volume.shape, np.uint8)
    annotation_arr[2] = truth
    annotation = sitk.GetImageFromArray(annotation_arr)
    annotation.CopyInformation(reference)
    masks = RegistrationPropagator().propagate(reference, annotation, 2, reference, "mri").masks
    np.testing.assert_array_equal(masks[2], truth)


@pytest.mark.parametrize("n_classes", [2, 4])
def test_a_slice_with_one_side_keeps_that_side(n_classes):
    """scikit-image numbers the seed values it gets 1..n: with the right side absent, the left side must
    not come back as the right one (nor vanish when its muscles are restored)."""
    image, truth4 = _two_muscles()
    truth = truth4 if n_classes == 4 else np.array([0, 1, 1, 2, 2], np.uint8)[truth4]
    left_only = np.where(np.isin(truth4, (3, 4)), truth, 0).astype(np.uint8)
    refined = refine_side_boundaries(_grow(left_only, 3)[None], image[None], n_classes, BAND)[0]
    left_ids = {2} if n_classes == 2 else {3, 4}
    assert set(np.unique(refined)) == {0, *left_ids}
    assert mean_dice(refined, left_only, n_classes) > 0.45  # the one side present (the absent one scores 0)
    assert 2 * ((refined > 0) & (left_only > 0)).sum() / ((refined > 0).sum() + (left_only > 0).sum()) > 0.97


def test_a_side_never_reaches_beyond_the_band_of_its_own_edge():
    """The walker's band is the band around both sides, so where they abut, a pixel near one side's edge can
    lie beyond the other's band. It is never given to the side it is far from, however the image connects
    them: here a strip of the right side's tissue runs over the left side's top edge, and without the limit
    40 pixels of it became right side up to 15 px from that side's edge."""
    sides = np.zeros((80, 120), np.uint8)
    sides[40:75, 20:60] = 1
    sides[40:75, 60:100] = 2
    image = np.full(sides.shape, 0.1, np.float32)
    image[sides == 1] = 0.9
    image[sides == 2] = 0.5
    image[36:40, 20:60] = 0.9  # the right side's tissue rises above its mask, within the band
    image[36:39, 60:75] = 0.9  # and runs on over the left side's top edge, past its own band
    refined = refine_side_boundaries(sides[None], image[None], 2, BAND)[0]
    for side in (1, 2):
        beyond = ndimage.distance_transform_edt(sides != side) > BAND
        assert not (refined == side)[beyond].any(), side
        assert (refined == side).sum() >= (sides == side).sum() * 0.9, side
    assert (refined[36:40, 20:56] == 1).all()  # within its band the right side still follows its tissue


def test_the_walker_follows_an_edge_that_only_a_second_channel_has():
    # a bright square beside a first channel of faint noise: walked on the noise alone the seeds' geometry
    # decides; with the square's channel beside it, the edge lands on the square's border
    flat = np.random.default_rng(0).normal(0.5, 0.02, (40, 40)).astype(np.float32)
    square = np.zeros((40, 40), np.float32)
    square[10:30, 10:30] = 1.0
    seeds = np.zeros((40, 40), np.int32)
    seeds[18:22, 18:22] = 2  # inside
    seeds[:3, :] = seeds[-3:, :] = seeds[:, :3] = seeds[:, -3:] = 1  # outside
    within = np.ones((40, 40), bool)
    on_both = walk(np.stack([flat, square], axis=-1), seeds, BETA, within)
    assert (on_both == 2).sum() == 400 and (on_both[10:30, 10:30] == 2).all()
    on_flat = walk(flat, seeds, BETA, within)
    assert (on_flat == 2).sum() < 300  # no edge: the inner seed's pull fades half-way to the outer seeds
