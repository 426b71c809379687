import numpy as np


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

    from nnsam2_assets.core.layout import DatasetLayout
    from nnsam2_assets.refinement.stages import predict_scan, scan_roi

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
