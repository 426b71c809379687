"""Ingest assets materialized through dagster.materialize on a real (temporary) instance."""

import shutil
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import yaml

from nnsam2_assets.core.layout import DatasetLayout
from nnsam2_assets.definitions import all_assets
from nnsam2_assets.defs.resources import NnsamStorage, build_resources
from nnsam2_assets.demo.datasets import write_demo_dataset
from nnsam2_assets.pipeline import INGEST


@pytest.fixture
def tiny(tmp_path: Path):
    data, storage = tmp_path / "data", tmp_path / "storage"
    write_demo_dataset(data, "tiny", "dixon", 3, seed=3, shape_yx=(64, 64), spacing=(3.2, 3.2, 4.0))
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("datasets", ["tiny"])
        yield instance, data, storage, build_resources(data, storage)


def _materialize(instance, resources, selection=INGEST, raise_on_error=True):
    return dg.materialize(
        all_assets(),
        selection=selection,
        partition_key="tiny",
        instance=instance,
        resources=resources,
        raise_on_error=raise_on_error,
    )


def _metadata(result, asset):
    return {k: v.value for k, v in result.asset_materializations_for_node(asset)[0].metadata.items()}


def test_ingest_writes_canonical_crops_with_metadata(tiny):
    instance, data, storage, resources = tiny
    result = _materialize(instance, resources)
    assert result.success
    meta = _metadata(result, "scans")
    assert meta["n_ok"] == 3 and meta["n_failed"] == 0
    assert "data:image/png;base64," in meta["preview"]
    layout = DatasetLayout(storage, "tiny")
    manifest = pd.read_parquet(layout.manifest)
    regions = pd.read_csv(data / "tiny" / "regions.csv")
    for row in manifest.itertuples():
        img = sitk.ReadImage(str(layout.scan_image(row.scan)))
        assert np.allclose(img.GetDirection(), np.eye(3).ravel())  # canonical LPS
        region = regions[regions.scan == row.scan].iloc[0]
        assert img.GetSize()[2] == abs(region.last_slice - region.first_slice) + 1
        assert layout.scan_fat(row.scan).exists() and layout.scan_expert(row.scan).exists()
    ann = _metadata(result, "reference_annotation")
    assert "data:image/png;base64," in ann["overlay"]
    assert ann["class_areas_px"] and min(ann["class_areas_px"].values()) > 0
    checks = result.get_asset_check_evaluations()
    assert [c.passed for c in checks if c.check_name == "all_scans_readable"] == [True]
    assert [c.passed for c in checks if c.check_name == "reference_is_representative"] == [True]


def test_rerun_recomputes_only_new_scans(tiny):
    instance, data, storage, resources = tiny
    _materialize(instance, resources, ["scans"])
    again = _metadata(_materialize(instance, resources, ["scans"]), "scans")
    assert again["n_recomputed"] == 0 and again["n_ok"] == 3
    scans = data / "tiny" / "scans"
    for part in ("water", "fat"):
        shutil.copy(scans / f"subj01_{part}.nii.gz", scans / f"subj09_{part}.nii.gz")
    shutil.copy(data / "tiny" / "experts" / "subj01.nii.gz", data / "tiny" / "experts" / "subj09.nii.gz")
    with open(data / "tiny" / "regions.csv", "a") as fh:
        row = pd.read_csv(data / "tiny" / "regions.csv").query("scan == 'subj01'").iloc[0]
        fh.write(f"subj09,{row.first_slice},{row.last_slice}\n")
    meta = _metadata(_materialize(instance, resources, ["scans"]), "scans")
    assert meta["n_ok"] == 4 and meta["n_recomputed"] == 1


def test_corrupt_scan_is_reported_and_the_others_finish(tiny):
    instance, data, storage, resources = tiny
    reference = yaml.safe_load((data / "tiny" / "dataset.yaml").read_text())["reference"]
    victim = next(s for s in ("subj00", "subj01", "subj02") if s != reference)
    bad = data / "tiny" / "scans" / f"{victim}_water.nii.gz"
    bad.write_bytes(b"\x1f\x8b garbage, not a NIfTI")
    result = _materialize(instance, resources)
    assert result.success  # one bad scan never sinks the dataset
    meta = _metadata(result, "scans")
    assert meta["n_ok"] == 2 and meta["n_failed"] == 1
    manifest = pd.read_parquet(DatasetLayout(storage, "tiny").manifest).set_index("scan")
    assert manifest.loc[victim, "status"] == "error"
    assert manifest.loc[victim, "error"].startswith(f"{bad}: truncated or corrupt gzip stream")
    check = [c for c in result.get_asset_check_evaluations() if c.check_name == "all_scans_readable"][0]
    assert (
        not check.passed and f"{victim}_water.nii.gz: truncated or corrupt gzip stream" in check.description
    )
    assert DatasetLayout(storage, "tiny").scan_image(reference).exists()
    assert _metadata(result, "reference_annotation")["reference"] == reference


def test_a_second_annotated_slice_without_a_class_fails_with_the_file_and_reason(tiny):
    instance, data, storage, resources = tiny
    path = data / "tiny" / "annotation.nii.gz"
    img = sitk.ReadImage(str(path))
    arr = sitk.GetArrayFromImage(img)
    z = int(np.flatnonzero(arr.reshape(arr.shape[0], -1).any(1))[0])
    arr[z + 1] = np.where(arr[z] == arr[z].max(), 0, arr[z])  # the second slice lacks a class
    out = sitk.GetImageFromArray(arr)
    out.CopyInformation(img)
    sitk.WriteImage(out, str(path))
    result = _materialize(instance, resources, raise_on_error=False)
    assert not result.success
    failure = [e for e in result.all_events if e.is_step_failure][0]
    assert failure.step_key == "reference_annotation"
    message = failure.step_failure_data.error.cause.message
    assert f"{path}: annotation lacks class(es)" in message and "(canonical slice" in message
    assert _metadata(result, "scans")["n_ok"] == 3  # ingest of the scans itself still succeeded


def test_invalid_partition_folder_is_refused_by_register(tmp_path):
    from nnsam2_assets.runner import register_datasets

    write_demo_dataset(tmp_path, "good", "t2", 2, seed=1, shape_yx=(48, 48), spacing=(4.0, 4.0, 4.0))
    shutil.copytree(tmp_path / "good", tmp_path / "Bad Name")
    with dg.instance_for_test() as instance:
        added, rejected = register_datasets(instance, tmp_path)
        assert added == ["good"]
        assert "invalid dataset name 'Bad Name'" in rejected["Bad Name"]
        assert instance.get_dynamic_partitions("datasets") == ["good"]


def test_a_dataset_folder_the_process_may_not_read_is_refused_alone(tmp_path, monkeypatch):
    """A dataset.yaml another user owns on a shared data root raised PermissionError out of registration and
    out of every sensor tick: no dataset was registered or run."""
    from nnsam2_assets.defs.sensors import scan_data_root
    from nnsam2_assets.ingest import convention
    from nnsam2_assets.runner import register_datasets

    for name in ("good", "locked"):
        write_demo_dataset(tmp_path, name, "t2", 2, seed=1, shape_yx=(48, 48), spacing=(4.0, 4.0, 4.0))
    read_yaml = convention.read_dataset_yaml
    locked = tmp_path / "locked" / "dataset.yaml"

    def permission_denied(path):
        if Path(path) == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return read_yaml(path)

    monkeypatch.setattr(convention, "read_dataset_yaml", permission_denied)
    with dg.instance_for_test() as instance:
        added, rejected = register_datasets(instance, tmp_path)
        assert added == ["good"]
        assert rejected == {"locked": f"{locked}: cannot be read (Permission denied)"}
    valid, refused = scan_data_root(NnsamStorage(data_root=str(tmp_path), storage_root=str(tmp_path / "s")))
    assert list(valid) == ["good"] and refused == rejected


def test_a_file_arriving_during_the_ingest_is_still_a_change_for_the_nightly_sweep(tiny, monkeypatch):
    """The fingerprint the sweep compares with was taken after the ingest: a scan copied in while the files
    were being read counted as ingested, and no later sweep ran it."""
    from nnsam2_assets.ingest import scans as ingest_module
    from nnsam2_assets.ingest.convention import folder_fingerprint

    instance, data, _storage, resources = tiny
    ingest_scans = ingest_module.ingest_scans
    scans_folder = data / "tiny" / "scans"

    def a_copy_arrives_meanwhile(spec, layout, log):
        report = ingest_scans(spec, layout, log=log)
        for part in ("water", "fat"):
            (scans_folder / f"late_{part}.nii.gz").write_bytes(
                (scans_folder / f"subj01_{part}.nii.gz").read_bytes()
            )
        return report

    monkeypatch.setattr(ingest_module, "ingest_scans", a_copy_arrives_meanwhile)
    result = _materialize(instance, resources, selection="scans")
    assert _metadata(result, "scans")["input_fingerprint"] != folder_fingerprint(data / "tiny")


def test_expert_labels_without_a_class_warn_that_it_is_not_compared(tiny):
    instance, data, storage, resources = tiny
    path = data / "tiny" / "experts" / "subj01.nii.gz"
    expert = sitk.ReadImage(str(path))
    arr = sitk.GetArrayFromImage(expert)
    arr[arr == 3] = 0  # the expert did not draw the left multifidus (label_map 3: left_mf)
    edited = sitk.GetImageFromArray(arr)
    edited.CopyInformation(expert)
    sitk.WriteImage(edited, str(path))
    assert _materialize(instance, resources, ["scans"]).success
    warnings = pd.read_parquet(DatasetLayout(storage, "tiny").manifest).set_index("scan").warnings
    assert f"expert labels {path} have no left_mf in the region" in warnings["subj01"]
    assert "expert labels" not in warnings["subj00"] + warnings["subj02"]


def test_an_outlying_reference_raises_a_warning_check_not_a_failure(tiny):
    instance, data, storage, resources = tiny
    reference = yaml.safe_load((data / "tiny" / "dataset.yaml").read_text())["reference"]
    path = data / "tiny" / "scans" / f"{reference}_water.nii.gz"
    img = sitk.ReadImage(str(path))
    arr = sitk.GetArrayFromImage(img)
    out = sitk.GetImageFromArray(arr.max() - arr)  # inverted contrast: unlike every other scan
    out.CopyInformation(img)
    sitk.WriteImage(out, str(path))
    result = _materialize(instance, resources)
    assert result.success
    check = [
        c for c in result.get_asset_check_evaluations() if c.check_name == "reference_is_representative"
    ][0]
    assert not check.passed and check.severity == dg.AssetCheckSeverity.WARN
    suggested = _metadata(result, "reference_ranking")["suggested_reference"]
    assert suggested != reference and f"consider annotating {suggested}" in check.description
    assert _metadata(result, "reference_ranking")["reference_rank"] == 3


def test_one_bad_scan_does_not_block_but_no_readable_scan_does(tiny):
    """``all_scans_readable`` reports a bad scan and lets the others go on; the blocking
    ``any_scan_readable`` stops the downstream assets only when no scan is left."""
    instance, data, storage, resources = tiny
    scans = sorted((data / "tiny" / "scans").glob("*_water.nii.gz"))
    reference = yaml.safe_load((data / "tiny" / "dataset.yaml").read_text())["reference"]
    next(p for p in scans if not p.name.startswith(reference)).write_bytes(b"not a nifti")
    result = _materialize(instance, resources, selection=["scans", "reference_annotation"])
    checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    assert checks == {
        "all_scans_readable": False,
        "any_scan_readable": True,
        "no_ingest_warnings": True,
        "regions_certain": True,
    }
    assert result.success and result.asset_materializations_for_node("reference_annotation")

    for path in scans:
        path.write_bytes(b"not a nifti")
    result = _materialize(
        instance, resources, selection=["scans", "reference_annotation"], raise_on_error=False
    )
    checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    assert checks == {
        "all_scans_readable": False,
        "any_scan_readable": False,
        "no_ingest_warnings": True,
        "regions_certain": True,
    }
    assert not result.asset_materializations_for_node("reference_annotation")  # blocked, not attempted
    started = {e.step_key for e in result.all_events if e.event_type_value == "STEP_START"}
    failed = [e for e in result.all_events if e.is_step_failure]
    assert started == {"scans"}  # reference_annotation was never attempted
    assert [e.step_key for e in failed] == ["scans"]
    assert "blocking asset check failed" in str(failed[0].step_failure_data.error.message)


def test_the_annotations_data_version_follows_the_slice_written_not_the_users_file(tmp_path):
    """Swapping the label map's erector spinae and multifidus ids rewrote the annotated slice with the same
    user file: the version, the file's digest, stayed, so nothing downstream saw the change."""
    from nnsam2_assets.ingest.annotation import write_reference_annotation
    from nnsam2_assets.ingest.convention import load_dataset
    from nnsam2_assets.testing.cohorts import write_tiny_dataset
    from nnsam2_assets.testing.direct import STEPS, DirectRun

    folder = write_tiny_dataset(tmp_path / "data", "ds", 2)
    run = DirectRun(tmp_path / "data", tmp_path / "storage", ["ds"])
    STEPS["scans"](run, "ds")
    layout = run.layout("ds")
    before = write_reference_annotation(load_dataset(tmp_path / "data", "ds"), layout).data_version
    again = write_reference_annotation(load_dataset(tmp_path / "data", "ds"), layout).data_version
    assert again == before  # the same slice written again
    config = folder / "dataset.yaml"
    swapped = "  1: right_mf\n  2: right_es\n  3: left_es\n  4: left_mf\n"
    config.write_text(
        config.read_text().replace("  1: right_es\n  2: right_mf\n  3: left_mf\n  4: left_es\n", swapped)
    )
    STEPS["scans"](DirectRun(tmp_path / "data", tmp_path / "storage", ["ds"]), "ds")
    assert write_reference_annotation(load_dataset(tmp_path / "data", "ds"), layout).data_version != before
