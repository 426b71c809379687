import numpy as np
import SimpleITK as sitk

from nnsam2_assets.refinement.roi import roi_from_mask


def _image(arr: np.ndarray) -> sitk.Image:
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((2.0, 1.0, 4.0))
    img.SetOrigin((-10.0, 5.0, 3.0))
    return img


def test_box_grows_by_margin_in_mm_and_clips_to_the_image():
    arr = np.zeros((4, 50, 60), np.uint8)
    arr[1, 20:30, 10:20] = 1
    arr[2, 25:35, 40:45] = 2  # the footprint spans all slices
    roi = roi_from_mask(_image(arr), margin_mm=6.0)
    # x spacing 2 mm -> 3 px, y spacing 1 mm -> 6 px
    assert (roi.x0, roi.x1, roi.y0, roi.y1) == (7, 48, 14, 41)
    edge = np.zeros_like(arr)
    edge[0, 0:3, 55:60] = 1
    clipped = roi_from_mask(_image(edge), margin_mm=20.0)
    assert (clipped.x0, clipped.x1, clipped.y0, clipped.y1) == (45, 60, 0, 23)
    assert roi_from_mask(_image(np.zeros_like(arr)), 5.0) is None


def test_crop_keeps_physical_position_and_paste_restores_the_grid():
    arr = np.random.default_rng(0).integers(0, 5, (4, 50, 60)).astype(np.uint8)
    img = _image(arr)
    mask = np.zeros_like(arr)
    mask[:, 20:30, 10:20] = 1
    roi = roi_from_mask(_image(mask), 4.0)
    cropped = roi.crop(img)
    assert cropped.GetSize() == (roi.x1 - roi.x0, roi.y1 - roi.y0, 4)
    # the same physical point holds the same value in both images
    point = img.TransformIndexToPhysicalPoint((roi.x0 + 3, roi.y0 + 2, 1))
    assert cropped.GetPixel(cropped.TransformPhysicalPointToIndex(point)) == img.GetPixel(
        (roi.x0 + 3, roi.y0 + 2, 1)
    )
    pasted = roi.paste(sitk.GetArrayFromImage(cropped), arr.shape)
    inside = np.zeros_like(arr, bool)
    inside[:, roi.y0 : roi.y1, roi.x0 : roi.x1] = True
    assert np.array_equal(pasted[inside], arr[inside])
    assert not pasted[~inside].any()
