import numpy as np

from nnsam2_assets.core.labels import to_class_space
from nnsam2_assets.core.masks import clean_labels, fragment_fraction, laterality_gap_voxels, split_sides


def _labels(n: int = 4) -> np.ndarray:
    a = np.zeros((n, 8, 8), np.uint8)
    a[:, 1:4, 1:3] = 1
    a[:, 1:4, 5:7] = 2
    return a


def test_class_space_and_cleanup():
    four = np.array([0, 1, 2, 3, 4, 5], np.uint8)
    assert to_class_space(four, 4, 2).tolist() == [0, 1, 1, 2, 2, 0]
    assert to_class_space(four, 4, 2, ignore=True).tolist() == [0, 1, 1, 2, 2, 3]
    # within one scheme too, an id outside it becomes background unless it is the carried ignore label, and a
    # wider integer type never wraps onto a class
    assert to_class_space(four, 4, 4).tolist() == [0, 1, 2, 3, 4, 0]
    assert to_class_space(four, 4, 4, ignore=True).tolist() == [0, 1, 2, 3, 4, 5]
    assert to_class_space(np.array([257, 2, -1, 3], np.int16), 2, 2).tolist() == [0, 2, 0, 0]
    labels = _labels()
    labels[0, 7, 7] = 1  # a stray fragment
    assert fragment_fraction(labels, 2) > 0
    cleaned = clean_labels(labels, 2)
    assert cleaned[0, 7, 7] == 0 and fragment_fraction(cleaned, 2) == 0


def test_filling_a_hole_never_takes_another_class_and_a_pocket_goes_to_the_innermost_class():
    # class 1 encloses class 2 on every slice, and class 2 is a ring around a background pocket; then the
    # same with the ids swapped: the enclosed class keeps its voxels whichever id it has
    for outer, inner in ((1, 2), (2, 1)):
        labels = np.zeros((2, 11, 11), np.uint8)
        labels[:, 1:10, 1:10] = outer
        labels[:, 3:8, 3:8] = inner
        labels[:, 5, 5] = 0  # the pocket inside the inner ring
        labels[:, 2, 2] = 0  # a hole in the outer class alone
        cleaned = clean_labels(labels, 2)
        assert (cleaned[:, 3:8, 3:8] == inner).all(), (outer, inner)
        assert (cleaned[:, 2, 2] == outer).all() and (cleaned == inner).sum() == 2 * 25
    assert (clean_labels(labels, 2, fill_holes=False)[:, 5, 5] == 0).all()


def test_split_sides_takes_the_muscle_interface_from_the_template_and_keeps_sides_apart():
    sides = np.zeros((3, 20, 40), np.uint8)
    sides[:, 5:15, 2:18] = 1  # right side (image left, x < 20), refined a little wider than the template
    sides[:, 5:15, 22:38] = 2
    muscles = np.zeros_like(sides)
    muscles[:, 6:14, 4:10], muscles[:, 6:14, 10:17] = 2, 1
    muscles[:, 6:14, 23:30], muscles[:, 6:14, 30:36] = 3, 4
    out = split_sides(sides, muscles, (4.0, 1.0, 1.0))
    assert set(np.unique(out[sides == 1])) == {1, 2} and set(np.unique(out[sides == 2])) == {3, 4}
    assert (out[:, 10, 2:10] == 2).all() and (out[:, 10, 10:18] == 1).all()  # nearest template voxel
    assert (out[:, 10, 22:30] == 3).all() and (out[:, 10, 30:38] == 4).all()
    assert ((out > 0) == (sides > 0)).all()  # the side masks' extent is kept exactly
    no_left = muscles.copy()
    no_left[no_left >= 3] = 0
    assert set(np.unique(split_sides(sides, no_left, (4.0, 1.0, 1.0))[sides == 2])) == {4}  # left ES


def test_laterality_is_positive_on_the_real_expert_labels_and_negative_when_swapped():
    """Real labels in patient coordinates: the MyoSegmenTUM experts and the TotalSegmentator CT labels."""
    import SimpleITK as sitk

    from nnsam2_assets.core.labels import TOTALSEG_LPM_IDS, class_map
    from nnsam2_assets.ingest.convention import map_labels_keep
    from nnsam2_assets.testing.realdata import TS, TUM

    cases = [
        (TUM / f"{c}_label_watergrid.nii.gz", {i: i for i in class_map(4)}, 4) for c in ("TUM01", "TUM02")
    ]
    cases.append((TS / "example_ct_sm_seg_total.nii.gz", {v: k for k, v in TOTALSEG_LPM_IDS.items()}, 2))
    for path, label_map, k in cases:
        labels = sitk.DICOMOrient(sitk.ReadImage(str(path)), "LPS")
        arr = map_labels_keep(sitk.GetArrayFromImage(labels), label_map)
        gap = laterality_gap_voxels(arr, k)
        assert gap is not None and gap > 10, (path.name, gap)
        swapped = np.zeros_like(arr)
        for name_id, side_swapped in ((1, 4), (2, 3), (3, 2), (4, 1)) if k == 4 else ((1, 2), (2, 1)):
            swapped[arr == name_id] = side_swapped
        assert laterality_gap_voxels(swapped, k) < -10, path.name
    assert laterality_gap_voxels(np.zeros((2, 4, 4), np.uint8), 2) is None


def test_overlays_read_like_a_radiology_axial_view():
    """Anterior up and the patient's right on the viewer's left, from a canonical [y, x] slice."""
    from nnsam2_assets.core.overlays import overlay_rgb

    image = np.zeros((8, 8), np.float32)
    labels = np.zeros((8, 8), np.uint8)
    labels[7, 0] = 1  # most posterior row, patient's right column: a right-side posterior muscle
    rgb = overlay_rgb(image, labels)
    assert rgb[7, 0].any() and not rgb[0, 0].any()  # drawn at the bottom left


def test_overlays_colour_a_two_class_left_side_cool_and_its_ignore_label_grey():
    """The 4-class palette drawn on 2-class masks gave the left side (id 2) the right multifidus' orange and
    the ignore label (3) the left multifidus' cyan."""
    from nnsam2_assets.core.overlays import overlay_rgb

    image = np.zeros((1, 3), np.float32)
    labels = np.array([[1, 2, 3]], np.uint8)
    right, left, ignore = overlay_rgb(image, labels, n_classes=2)[0].astype(int)
    assert right[0] > right[2] and left[2] > left[0]  # right warm, left cool
    assert ignore[0] == ignore[1] == ignore[2]  # grey
    four = overlay_rgb(image, np.array([[1, 4, 5]], np.uint8), n_classes=4)[0].astype(int)
    assert four[0][0] > four[0][2] and four[1][2] > four[1][0] and four[2][0] == four[2][2]
