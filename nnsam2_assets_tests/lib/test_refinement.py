import numpy as np

from nnsam2_assets.lib.postprocess import clean_labels, fragment_fraction, to_class_space
from nnsam2_assets.lib.refinement import agreeing_slices


def _labels(n: int = 4) -> np.ndarray:
    a = np.zeros((n, 8, 8), np.uint8)
    a[:, 1:4, 1:3] = 1
    a[:, 1:4, 5:7] = 2
    return a


def test_agreeing_slices_keeps_slices_above_the_threshold():
    a = _labels()
    b = a.copy()
    b[:2] = 0
    b[:2, 1:3, 1:2], b[:2, 1:3, 5:6] = 1, 2  # the two lower slices disagree
    assert agreeing_slices(a, b, 2, 0.85).tolist() == [False, False, True, True]


def test_agreeing_slices_relaxes_to_the_better_half_instead_of_all_ignore():
    a = _labels()
    b = np.zeros_like(a)
    b[:, 1:3, 1:2], b[:, 1:3, 5:6] = 1, 2
    b[3] = a[3]  # one slice agrees better than the others, none reaches 0.999
    kept = agreeing_slices(a, b, 2, 0.999)
    assert kept.any() and kept[3]
    assert not agreeing_slices(a, np.zeros_like(a), 2, 0.85).any()  # nothing to compare: nothing kept


def test_class_space_and_cleanup():
    four = np.array([0, 1, 2, 3, 4, 5], np.uint8)
    assert to_class_space(four, 4, 2).tolist() == [0, 1, 1, 2, 2, 0]
    assert to_class_space(four, 4, 2, ignore=True).tolist() == [0, 1, 1, 2, 2, 3]
    labels = _labels()
    labels[0, 7, 7] = 1  # a stray fragment
    assert fragment_fraction(labels, 2) > 0
    cleaned = clean_labels(labels, 2)
    assert cleaned[0, 7, 7] == 0 and fragment_fraction(cleaned, 2) == 0


class _BoxPredictor:
    """Stands in for nnunet.Predictor: labels every voxel of the image it is given, and records its size."""

    def __init__(self):
        self.sizes = []

    def predict(self, image):
        import SimpleITK as sitk

        self.sizes.append(image.GetSize())
        return np.ones(sitk.GetArrayFromImage(image).shape, np.uint8)


def test_prediction_runs_in_the_muscle_box_and_lands_on_the_full_grid(tmp_path):
    import SimpleITK as sitk

    from nnsam2_assets.lib.layout import DatasetLayout
    from nnsam2_assets.lib.refinement import predict_scan, scan_roi

    layout = DatasetLayout(tmp_path, "ds")
    img = sitk.GetImageFromArray(np.zeros((5, 60, 80), np.float32))
    img.SetSpacing((1.0, 1.0, 3.0))
    mask = np.zeros((5, 60, 80), np.uint8)
    mask[2, 30:40, 20:50] = 3
    mask_img = sitk.GetImageFromArray(mask)
    mask_img.CopyInformation(img)
    layout.masks("s1").parent.mkdir(parents=True)
    sitk.WriteImage(mask_img, str(layout.masks("s1")))

    assert scan_roi(layout, "s1", None) is None  # profiles without a margin use whole slices
    roi = scan_roi(layout, "s1", 5.0)
    predictor = _BoxPredictor()
    out = predict_scan(predictor, img, roi)
    assert predictor.sizes == [(40, 20, 5)]  # x 15..55, y 25..45: the box plus 5 mm each side
    assert out.GetSize() == img.GetSize() and out.GetOrigin() == img.GetOrigin()
    labelled = sitk.GetArrayFromImage(out).astype(bool)
    assert labelled[:, 25:45, 15:55].all() and labelled.sum() == 5 * 20 * 40
