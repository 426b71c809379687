"""Corrections: which slices a user corrected (against the final mask they started from), the record, the
corrected final mask, and bad correction files refused for their scan alone."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from nnsam2_assets.core.imaging import read_image, to_original_grid
from nnsam2_assets.core.storage import sha256_file
from nnsam2_assets.ingest.convention import load_dataset
from nnsam2_assets.ingest.scans import ok_scans
from nnsam2_assets.refinement.corrections import (
    apply_correction,
    current_record,
    pending_corrections,
    read_record,
    record_corrections,
)
from nnsam2_assets.testing.cohorts import write_tiny_dataset
from nnsam2_assets.testing.direct import STEPS, DirectRun


@pytest.fixture
def ingested(tmp_path):
    folder = write_tiny_dataset(tmp_path / "data", "ds", 3, seed=2)
    run = DirectRun(tmp_path / "data", tmp_path / "storage", ["ds"])
    STEPS["scans"](run, "ds")
    (folder / "corrections").mkdir()
    return run, folder


def _canonical_expert(run: DirectRun, scan: str) -> np.ndarray:
    return sitk.GetArrayFromImage(read_image(run.layout("ds").scan_expert(scan)))


def _publish(run: DirectRun, scan: str, canonical: np.ndarray) -> None:
    """Write a final mask as final_masks does: canonical crop and original grid."""
    layout = run.layout("ds")
    like = read_image(layout.scan_image(scan))
    image = sitk.GetImageFromArray(canonical.astype(np.uint8))
    image.CopyInformation(like)
    layout.final_mask_canonical(scan).parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(layout.final_mask_canonical(scan)))
    original = read_image(run.spec("ds").scans[scan].image)
    sitk.WriteImage(to_original_grid(image, original), str(layout.final_mask(scan)))


def _drop(run: DirectRun, folder, scan: str, canonical: np.ndarray) -> None:
    """The user's correction: a canonical mask put back on the scan's original grid."""
    like = read_image(run.layout("ds").scan_image(scan))
    image = sitk.GetImageFromArray(canonical.astype(np.uint8))
    image.CopyInformation(like)
    original = read_image(run.spec("ds").scans[scan].image)
    sitk.WriteImage(to_original_grid(image, original), str(folder / "corrections" / f"{scan}.nii.gz"))


def _published_model(run: DirectRun):
    """A scan's model mask published as final_masks would, and two of its labelled slices to edit."""
    layout, scan = run.layout("ds"), sorted(run.spec("ds").scans)[1]
    model = _canonical_expert(run, scan)
    _publish(run, scan, model)
    nonempty = np.flatnonzero(model.reshape(len(model), -1).any(1))
    return layout, scan, model, int(nonempty[1]), int(nonempty[-2])


def test_corrected_slices_are_those_that_differ_from_the_mask_the_user_started_from(ingested):
    run, folder = ingested
    layout, scan, published, first, second = _published_model(run)

    edited = published.copy()
    edited[first] = 0  # erasing a slice is a correction
    _drop(run, folder, scan, edited)
    recorded = record_corrections(load_dataset(run.data_root, "ds"), layout)
    assert list(recorded.changed) == [scan] and not recorded.refused
    record = read_record(layout, scan)
    assert record.corrected_slices == [first]
    assert record.base_mask_sha256 == sha256_file(layout.final_mask(scan))

    applied = apply_correction(published, layout, read_record(layout, scan), 4)
    np.testing.assert_array_equal(applied.mask, edited)
    assert applied.n_slices == 1 and applied.dice_before == 0.0
    assert applied.foreground_change == -int((published[first] > 0).sum())

    # unchanged file: nothing recorded again
    assert not record_corrections(load_dataset(run.data_root, "ds"), layout).changed
    # edited again from the corrected publication: both edits count
    _publish(run, scan, edited)
    again = edited.copy()
    again[second] = 0
    _drop(run, folder, scan, again)
    record_corrections(load_dataset(run.data_root, "ds"), layout)
    assert read_record(layout, scan).corrected_slices == sorted([first, second])
    # removed: the record is no longer used, the final mask is the model's again
    (folder / "corrections" / f"{scan}.nii.gz").unlink()
    assert record_corrections(load_dataset(run.data_root, "ds"), layout).removed == [scan]
    assert current_record(layout, scan) is None and read_record(layout, scan).removed
    assert apply_correction(published, layout, current_record(layout, scan), 4) is None
    assert not pending_corrections(load_dataset(run.data_root, "ds"), layout)


def test_without_a_published_mask_every_labelled_slice_is_corrected(ingested):
    run, folder = ingested
    scan = sorted(run.spec("ds").scans)[2]
    truth = _canonical_expert(run, scan)
    _drop(run, folder, scan, truth)
    record_corrections(load_dataset(run.data_root, "ds"), run.layout("ds"))
    record = read_record(run.layout("ds"), scan)
    assert record.base_mask_sha256 is None
    assert record.corrected_slices == np.flatnonzero(truth.reshape(len(truth), -1).any(1)).tolist()


def test_a_bad_correction_is_refused_for_its_scan_alone(ingested):
    run, folder = ingested
    scans = sorted(run.spec("ds").scans)
    good, wrong_grid, foreign = scans
    _drop(run, folder, good, _canonical_expert(run, good))
    small = sitk.Image(8, 8, 3, sitk.sitkUInt8)
    sitk.WriteImage(small, str(folder / "corrections" / f"{wrong_grid}.nii.gz"))
    values = _canonical_expert(run, foreign)
    values[values == 1] = 9
    _drop(run, folder, foreign, values)
    recorded = record_corrections(load_dataset(run.data_root, "ds"), run.layout("ds"))
    assert list(recorded.changed) == [good]
    assert (
        f"{wrong_grid}.nii.gz: correction is not on the scan's original grid" in recorded.refused[wrong_grid]
    )
    assert "label values [9] are not classes 1..4" in recorded.refused[foreign]
    assert read_record(run.layout("ds"), wrong_grid) is None


def test_pending_corrections_until_recorded_and_a_refused_file_until_it_changes(ingested):
    run, folder = ingested
    layout = run.layout("ds")
    good, bad = sorted(run.spec("ds").scans)[1:]
    _drop(run, folder, good, _canonical_expert(run, good))
    sitk.WriteImage(sitk.Image(8, 8, 3, sitk.sitkUInt8), str(folder / "corrections" / f"{bad}.nii.gz"))
    spec = load_dataset(run.data_root, "ds")
    assert pending_corrections(spec, layout) == sorted([good, bad])
    recorded = record_corrections(spec, layout)
    assert list(recorded.changed) == [good] and list(recorded.refused) == [bad]
    assert pending_corrections(spec, layout) == []  # the refused file is not retried on every tick
    _drop(run, folder, bad, _canonical_expert(run, bad))  # fixed by the user
    assert pending_corrections(load_dataset(run.data_root, "ds"), layout) == [bad]
    (folder / "corrections" / f"{good}.nii.gz").unlink()
    spec = load_dataset(run.data_root, "ds")
    assert pending_corrections(spec, layout) == sorted([good, bad])
    recorded = record_corrections(spec, layout)
    assert recorded.removed == [good] and list(recorded.changed) == [bad]


def _ingest_again(run: DirectRun) -> None:
    STEPS["scans"](DirectRun(run.data_root, run.storage_root, ["ds"]), "ds")


def _one_slice_erased(run: DirectRun, folder, middle: bool):
    """A published final mask, and a recorded correction that erases one of its slices (the middle one of
    the mask, or its second): (layout, scan, erased canonical slice)."""
    layout, scan = run.layout("ds"), sorted(run.spec("ds").scans)[1]
    published = _canonical_expert(run, scan)
    _publish(run, scan, published)
    nonempty = np.flatnonzero(published.reshape(len(published), -1).any(1))
    z = int(nonempty[len(nonempty) // 2] if middle else nonempty[1])
    edited = published.copy()
    edited[z] = 0
    _drop(run, folder, scan, edited)
    record_corrections(load_dataset(run.data_root, "ds"), layout)
    return layout, scan, z


def _grow_region_down_by_two(folder, scan: str) -> None:
    """The scan's regions.csv row given two more slices at the inferior end: every slice of the old crop moves
    up by two."""
    regions = folder / "regions.csv"
    rows = regions.read_text().splitlines()
    row = next(r for r in rows if r.startswith(f"{scan},"))
    _, first, last, *rest = row.split(",")
    lo, hi = sorted((int(first), int(last)))
    assert lo >= 2
    rows[rows.index(row)] = ",".join([scan, str(lo - 2), str(hi), *rest])
    regions.write_text("\n".join(rows) + "\n")


def test_a_new_region_places_the_recorded_edit_on_the_new_crop(ingested):
    """The record numbers slices on the scan's crop; when a regions.csv row moves the crop, the same edit
    (the same file slice) is placed on the new crop before it is used again, never at its old number."""
    run, folder = ingested
    layout, scan, z = _one_slice_erased(run, folder, middle=True)
    point = read_image(layout.scan_image(scan)).TransformIndexToPhysicalPoint((0, 0, z))

    _grow_region_down_by_two(folder, scan)
    _ingest_again(run)
    assert scan in ok_scans(layout)
    assert current_record(layout, scan) is None  # numbered on the old crop: not used as it is
    assert scan in pending_corrections(load_dataset(run.data_root, "ds"), layout)

    recorded = record_corrections(load_dataset(run.data_root, "ds"), layout)
    assert list(recorded.changed) == [scan]
    moved = current_record(layout, scan)
    crop = read_image(layout.scan_image(scan))
    (new_z,) = moved.corrected_slices
    assert new_z != z  # the crop moved under the edit
    assert np.allclose(crop.TransformIndexToPhysicalPoint((0, 0, new_z)), point)  # the same slice of the scan
    corrected = read_image(layout.correction_labels(scan))
    assert not sitk.GetArrayViewFromImage(corrected)[new_z].any()  # erased there, as the user did
    assert apply_correction(np.ones(corrected.GetSize()[::-1], np.uint8), layout, moved, 4).n_slices == 1


def test_the_scans_asset_places_a_correction_recorded_before_its_run_moved_the_crop(ingested):
    """The new-data sensor records corrections before the run it requests. Where that run's ingest moved the
    crop (a regions.csv row changed with the correction), its stages and final masks found the record
    numbered on the old crop and published the uncorrected mask, until the next sensor tick."""
    import dagster as dg

    from nnsam2_assets.definitions import all_assets
    from nnsam2_assets.defs.resources import build_resources

    run, folder = ingested
    layout, scan, z = _one_slice_erased(run, folder, middle=True)  # recorded, as the sensor does
    _grow_region_down_by_two(folder, scan)
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("datasets", ["ds"])
        dg.materialize(
            all_assets(),
            selection="scans",
            partition_key="ds",
            instance=instance,
            resources=build_resources(run.data_root, run.storage_root),
        )
    placed = current_record(layout, scan)
    assert placed is not None and placed.corrected_slices == [z + 2]  # the same file slice, two further up


def test_a_scan_that_fails_one_ingest_keeps_its_correction(ingested):
    run, folder = ingested
    layout, scan, z = _one_slice_erased(run, folder, middle=False)

    water = folder / "scans" / f"{scan}_water.nii.gz"
    good = water.read_bytes()
    water.write_bytes(good[: len(good) // 2])  # truncated for one run
    _ingest_again(run)
    recorded = record_corrections(load_dataset(run.data_root, "ds"), layout)
    assert not recorded.removed and read_record(layout, scan).corrected_slices == [z]
    water.write_bytes(good)
    _ingest_again(run)  # back, though its final mask was removed with its other outputs
    record_corrections(load_dataset(run.data_root, "ds"), layout)
    assert current_record(layout, scan).corrected_slices == [z]  # the user's one edit, not every slice


def test_a_first_correction_after_the_region_moved_is_compared_with_the_published_mask_slice_by_position(
    ingested,
):
    """The region moved by one slice at both ends (the same length) and the scan was ingested again before
    final_masks ran: the published canonical mask is on the old crop with the new crop's shape. A
    correction erasing one slice of the published mask is that one slice, not every slice of the crop."""
    run, folder = ingested
    layout, scan = run.layout("ds"), sorted(run.spec("ds").scans)[1]
    _publish(run, scan, _canonical_expert(run, scan))
    old_crop = read_image(layout.scan_image(scan))

    regions = folder / "regions.csv"
    rows = regions.read_text().splitlines()
    row = next(r for r in rows if r.startswith(f"{scan},"))
    _, first, last, *rest = row.split(",")
    lo, hi = sorted((int(first), int(last)))
    assert lo >= 1
    shifted = [str(int(v) - 1) if v.strip() else v for v in rest]  # an L4/L5 slice moves with the crop
    rows[rows.index(row)] = ",".join([scan, str(lo - 1), str(hi - 1), *shifted])
    regions.write_text("\n".join(rows) + "\n")
    _ingest_again(run)
    new_crop = read_image(layout.scan_image(scan))
    assert new_crop.GetSize() == old_crop.GetSize() and new_crop.GetOrigin() != old_crop.GetOrigin()

    # the user edits final_masks/<scan>.nii.gz, the published mask on the original grid: one slice erased
    published = read_image(layout.final_mask(scan))
    edited = sitk.GetArrayFromImage(published)
    z_axis = int(np.argmax(np.abs(np.array(published.GetDirection()).reshape(3, 3)[2])))
    with_muscle = np.flatnonzero(
        np.moveaxis(edited, 2 - z_axis, 0).reshape(edited.shape[2 - z_axis], -1).any(1)
    )
    erased = int(with_muscle[len(with_muscle) // 2])
    np.moveaxis(edited, 2 - z_axis, 0)[erased] = 0
    correction = sitk.GetImageFromArray(edited)
    correction.CopyInformation(published)
    sitk.WriteImage(correction, str(folder / "corrections" / f"{scan}.nii.gz"))

    record_corrections(load_dataset(run.data_root, "ds"), layout)
    (z,) = read_record(layout, scan).corrected_slices
    index = [0, 0, 0]
    index[z_axis] = erased
    point = published.TransformIndexToPhysicalPoint(index)
    assert abs(new_crop.TransformPhysicalPointToContinuousIndex(point)[2] - z) < 1e-3


def _erase_and_record(run: DirectRun, folder, scan: str, base: np.ndarray, z: int) -> np.ndarray:
    edited = base.copy()
    edited[z] = 0
    _drop(run, folder, scan, edited)
    record_corrections(load_dataset(run.data_root, "ds"), layout=run.layout("ds"))
    return edited


def test_a_correction_put_back_before_its_removal_is_published_keeps_its_edits(ingested):
    """The user takes the file away and puts it back (or saves it again) before the final mask without it is
    published: the published mask still carries the edits, so comparing with it alone found no slice and the
    correction was silently lost. Once the mask without them is published, a new file counts only its own."""
    run, folder = ingested
    layout, scan, model, first, second = _published_model(run)
    edited = _erase_and_record(run, folder, scan, model, first)
    _publish(run, scan, edited)  # final_masks ran with the correction
    saved = (folder / "corrections" / f"{scan}.nii.gz").read_bytes()

    (folder / "corrections" / f"{scan}.nii.gz").unlink()
    assert record_corrections(load_dataset(run.data_root, "ds"), layout).removed == [scan]
    (folder / "corrections" / f"{scan}.nii.gz").write_bytes(saved)  # back before final_masks ran
    assert pending_corrections(load_dataset(run.data_root, "ds"), layout) == [scan]
    recorded = record_corrections(load_dataset(run.data_root, "ds"), layout)
    assert list(recorded.changed) == [scan] and current_record(layout, scan).corrected_slices == [first]

    (folder / "corrections" / f"{scan}.nii.gz").unlink()
    record_corrections(load_dataset(run.data_root, "ds"), layout)
    _publish(run, scan, model)  # final_masks ran without it: the model's mask again
    _erase_and_record(run, folder, scan, model, second)  # a new correction from that mask
    assert current_record(layout, scan).corrected_slices == [second]


def test_a_scan_the_dataset_excludes_for_a_while_keeps_its_correction(ingested):
    """A second file of the same scan (``x.nii`` beside ``x.nii.gz``) excludes the scan until it is resolved;
    its record was deleted as if the scan had left, and the correction came back as no slice at all."""
    run, folder = ingested
    layout, scan, model, z, _ = _published_model(run)
    edited = _erase_and_record(run, folder, scan, model, z)
    _publish(run, scan, edited)

    water = folder / "scans" / f"{scan}_water.nii.gz"
    duplicate = water.with_name(f"{scan}_water.nii")
    sitk.WriteImage(read_image(water), str(duplicate))
    spec = load_dataset(run.data_root, "ds")
    assert scan in spec.excluded and scan not in spec.scans
    # the sensor records before its run ingests: the manifest still lists the scan as ingested
    assert not pending_corrections(spec, layout)
    recorded = record_corrections(spec, layout)
    assert scan not in recorded.removed and not read_record(layout, scan).removed
    _ingest_again(run)  # the run: the scan is excluded and its outputs go
    assert not record_corrections(load_dataset(run.data_root, "ds"), layout).scans
    duplicate.unlink()
    _ingest_again(run)
    record_corrections(load_dataset(run.data_root, "ds"), layout)
    assert current_record(layout, scan).corrected_slices == [z]


def test_an_empty_correction_is_refused_not_taken_as_every_slice_erased(ingested):
    """An empty layer saved by mistake (ITK-SNAP's new segmentation) had become a correction of every
    labelled slice to background: the scan's final mask was erased and trained on as exact labels."""
    run, folder = ingested
    layout, scan, model, _, _ = _published_model(run)
    _drop(run, folder, scan, np.zeros_like(model))
    recorded = record_corrections(load_dataset(run.data_root, "ds"), layout)
    assert not recorded.changed and "holds no labelled voxel" in recorded.refused[scan]
    assert f"{scan}.nii.gz" in recorded.refused[scan] and read_record(layout, scan) is None


def test_a_correction_labelled_only_outside_the_scans_region_is_refused(ingested):
    """Its labels lie where the region crop has no slice: on the crop it is empty, and every labelled slice of
    the final mask would have been erased, as by an empty file."""
    run, folder = ingested
    layout, scan, model, _, _ = _published_model(run)
    original = read_image(run.spec("ds").scans[scan].image)
    inside = np.zeros(original.GetSize()[::-1], bool)  # [k, j, i] of the file
    on_crop = sitk.GetImageFromArray(np.ones_like(model))
    on_crop.CopyInformation(read_image(layout.scan_image(scan)))
    inside |= sitk.GetArrayFromImage(to_original_grid(on_crop, original)) > 0
    axis = next(a for a in range(3) if not inside.any(axis=tuple(b for b in range(3) if b != a)).all())
    outside_index = int(np.flatnonzero(~inside.any(axis=tuple(b for b in range(3) if b != axis)))[0])
    labels = np.zeros(inside.shape, np.uint8)
    np.moveaxis(labels, axis, 0)[outside_index] = 1
    image = sitk.GetImageFromArray(labels)
    image.CopyInformation(original)
    sitk.WriteImage(image, str(folder / "corrections" / f"{scan}.nii.gz"))
    recorded = record_corrections(load_dataset(run.data_root, "ds"), layout)
    assert not recorded.changed and "no labelled voxel in the scan's region" in recorded.refused[scan]


def test_a_record_from_before_ingest_keys_on_another_crop_is_not_used(ingested):
    """A record written before records named their crop (ingest key "") was taken as current whatever the
    crop: after a new region its labels, of the old crop's size, were pasted into the new crop's training
    label and every dataset's stage training failed."""
    import json

    from nnsam2_assets.refinement.corrections import corrected_exact_labels

    run, folder = ingested
    layout, scan, z = _one_slice_erased(run, folder, middle=True)
    record = json.loads(layout.correction_record(scan).read_text())
    layout.correction_record(scan).write_text(json.dumps({**record, "ingest_key": "", "slice_points": []}))
    assert current_record(layout, scan) is not None  # same crop: the old record serves as it did
    assert list(corrected_exact_labels(layout)) == [scan]

    _grow_region_down_by_two(folder, scan)
    _ingest_again(run)
    assert current_record(layout, scan) is None and corrected_exact_labels(layout) == {}
