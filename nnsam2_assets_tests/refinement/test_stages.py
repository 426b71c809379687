import numpy as np
import pytest


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
    from nnsam2_assets.refinement.prediction import predict_scan, scan_roi

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


@pytest.mark.parametrize("exact_slice", [False, True])
def test_a_stage_whose_inputs_agree_nowhere_trains_on_the_pseudo_labels(tmp_path, monkeypatch, exact_slice):
    """Models too weak to predict any muscle (a tiny training budget) leave a later stage no agreeing slice;
    it then learns from the propagated pseudo-labels, as stage 1 does, and says so, instead of failing. A
    slice known exactly (a further annotated or a corrected slice) does not stand in for what the stage
    would have learned: it falls back all the same, and the exact slice joins the pseudo-labels."""
    import SimpleITK as sitk

    from nnsam2_assets.core import silent
    from nnsam2_assets.core.layout import model_pointer, stage_prediction
    from nnsam2_assets.refinement import stage_labels
    from nnsam2_assets.refinement.rules import STAGE_RULES
    from nnsam2_assets.testing.cohorts import write_tiny_dataset
    from nnsam2_assets.testing.direct import DirectRun, run_direct

    run = DirectRun(tmp_path / "data", tmp_path / "storage", ["weak"])
    write_tiny_dataset(run.data_root, "weak", 3, seed=5)
    run_direct(run, phases=("datasets",))
    pool = run.pool()
    for stage in ("stage1", "stage2"):  # models that predicted nothing anywhere
        model_dir = tmp_path / "models" / stage
        for dataset, scan, layout in pool.items():
            image = sitk.ReadImage(str(layout.scan_image(scan)))
            empty = sitk.Image(image.GetSize(), sitk.sitkUInt8)
            empty.CopyInformation(image)
            path = stage_prediction(model_dir, dataset, scan)
            path.parent.mkdir(parents=True, exist_ok=True)
            sitk.WriteImage(empty, str(path))
        pointer = model_pointer(run.storage_root, stage)
        pointer.parent.mkdir(parents=True, exist_ok=True)
        pointer.write_text(f'{{"model_dir": "{model_dir}"}}')

    if exact_slice:  # the reference's lowest slice, outside its held-out slab, as drawn by a user
        from nnsam2_assets.refinement.holdout import held_out_slab

        layout = pool.layouts["weak"]
        reference = held_out_slab(layout).scan
        extra = [(reference, [0], layout.masks(reference))]
        real = stage_labels.exact_labels
        monkeypatch.setattr(
            stage_labels, "exact_labels", lambda lay: real(lay) + (extra if lay is layout else [])
        )
    first, pseudo_labels = stage_labels.stage_labels("stage1", pool, run.storage_root, None)
    selection, labels, source = stage_labels.next_stage_labels(
        "stage3", pool, run.storage_root, STAGE_RULES["stage3"], silent
    )
    assert pseudo_labels and labels.keys() == pseudo_labels.keys() and len(labels) == len(first)
    assert all(np.array_equal(labels[k], pseudo_labels[k]) for k in labels)
    assert "stage-1 pseudo-labels" in source and "stage2" in source
    assert selection.relaxed.all() and selection.selected.tolist() == first.selected.tolist()
    assert selection.mean_dice.notna().all()  # the agreement that was measured stays in the table


def test_a_later_stage_learns_the_previous_predictions_finished_on_the_image(tmp_path):
    """Stage 2's labels are stage 1's predictions after the final masks' finish (largest component, holes,
    side edges re-placed on the scan's image), not the raw ones whose excess would be learned as label."""
    import SimpleITK as sitk
    from scipy import ndimage

    from nnsam2_assets.core import silent
    from nnsam2_assets.core.imaging import read_array, read_image
    from nnsam2_assets.core.labels import ignore_label
    from nnsam2_assets.core.layout import model_pointer, stage_prediction
    from nnsam2_assets.refinement import stage_labels
    from nnsam2_assets.refinement.finishing import finish_refined
    from nnsam2_assets.refinement.rules import STAGE_RULES
    from nnsam2_assets.testing.cohorts import write_tiny_dataset
    from nnsam2_assets.testing.direct import DirectRun, run_direct

    run = DirectRun(tmp_path / "data", tmp_path / "storage", ["grown"])
    write_tiny_dataset(run.data_root, "grown", 3, seed=7)
    run_direct(run, phases=("datasets",))
    pool = run.pool()
    model_dir = tmp_path / "models" / "stage1"
    raw = {}
    for dataset, scan, layout in pool.items():
        # a stage-1 model that grew every side by two pixels in plane: its edges are off the image's edges
        sides = pool.to_pool(dataset, read_array(layout.masks(scan)))
        grown = np.zeros_like(sides)
        for side in (2, 1):
            grown[ndimage.binary_dilation(sides == side, np.ones((1, 5, 5), bool)) & (grown == 0)] = side
        image = read_image(layout.scan_image(scan))
        prediction = sitk.GetImageFromArray(grown)
        prediction.CopyInformation(image)
        path = stage_prediction(model_dir, dataset, scan)
        path.parent.mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(prediction, str(path))
        raw[(dataset, scan)] = (grown, image, pool.modality[dataset])
    pointer = model_pointer(run.storage_root, "stage1")
    pointer.parent.mkdir(parents=True, exist_ok=True)
    pointer.write_text(f'{{"model_dir": "{model_dir}"}}')

    _, labels, source = stage_labels.next_stage_labels(
        "stage2", pool, run.storage_root, STAGE_RULES["stage2"], silent
    )
    assert labels and "finished on the image" in source
    ignore = ignore_label(pool.classes)
    changed = 0
    for key, label in labels.items():
        grown, image, modality = raw[key]
        finished = finish_refined(grown, image, modality, pool.classes)
        taught = label != ignore
        assert taught.any() and np.array_equal(label[taught], finished[taught])
        changed += int((label[taught] != grown[taught]).sum())
    assert changed > 0  # the finish moved the grown edges: raw predictions would fail the equality above
