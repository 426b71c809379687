from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnsam2_assets.core.imaging import ScanError, read_image
from nnsam2_assets.core.labels import merge_sides
from nnsam2_assets.ingest.annotation import validate_annotation
from nnsam2_assets.ingest.convention import load_dataset, map_labels, validate_dataset_key
from nnsam2_assets.ingest.errors import DatasetError
from nnsam2_assets.ingest.regions import Region
from nnsam2_assets.testing.cohorts import write_tiny_dataset
from nnsam2_assets.testing.realdata import write_yaml


def _write(img_arr: np.ndarray, path: Path, spacing=(1.0, 1.0, 3.0)) -> sitk.Image:
    img = sitk.GetImageFromArray(img_arr)
    img.SetSpacing(spacing)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path))
    return img


def _tiny_dataset(root: Path, annotation: np.ndarray | None = None, **cfg) -> Path:
    folder = root / "tiny"
    rng = np.random.default_rng(0)
    for scan in ("a", "b"):
        _write(rng.normal(size=(6, 16, 16)).astype(np.float32), folder / "scans" / f"{scan}.nii.gz")
    if annotation is None:
        annotation = np.zeros((6, 16, 16), np.uint8)
        annotation[3, 4:8, 2:6] = 1
        annotation[3, 4:8, 10:14] = 2
    _write(annotation, folder / "annotation.nii.gz")
    base = {
        "modality": "mri",
        "sequence": "t2",
        "reference": "a",
        "label_map": {1: "right_lpm", 2: "left_lpm"},
    }
    base.update(cfg)
    write_yaml(folder / "dataset.yaml", base)
    return folder


@pytest.mark.parametrize(
    "name", ["a/b", "..", "x,y", "p|q", "Upper", "", "-lead", "with space", "a__b", "tum\n"]
)
def test_partition_keys_must_be_slugs(name):
    with pytest.raises(DatasetError, match="invalid dataset name"):
        validate_dataset_key(name)


def test_scan_ids_are_whole_matches():
    from nnsam2_assets.ingest.convention import is_valid_scan_id

    assert is_valid_scan_id("subj03") and is_valid_scan_id("TUM01.v2")
    assert not is_valid_scan_id("subj03\n") and not is_valid_scan_id("a..b") and not is_valid_scan_id("_x")


@pytest.mark.parametrize("name", ["tum", "demo-ct", "cohort_2025", "a1"])
def test_valid_partition_keys(name):
    assert validate_dataset_key(name) == name


def test_label_maps_and_side_merge():
    arr = np.array([0, 87, 86, 87])
    assert map_labels(arr, {87: 1, 86: 2}, "x").tolist() == [0, 1, 2, 1]
    with pytest.raises(
        ScanError, match=r"lab\.nii\.gz: label values \[5\] are not in the dataset's label_map"
    ):
        map_labels(np.array([0, 1, 5]), {1: 1, 2: 2}, "lab.nii.gz")
    # a float label file (an interpolating resampler's output): 1.5 had passed as 1 and its voxels were dropped
    assert map_labels(np.array([0.0, 1.0, 2.0]), {1: 1, 2: 2}, "x").tolist() == [0, 1, 2]
    with pytest.raises(ScanError, match=r"lab\.nii\.gz: label values \[1\.5\] are not whole numbers"):
        map_labels(np.array([0.0, 1.0, 1.5]), {1: 1, 2: 2}, "lab.nii.gz")
    assert merge_sides(np.array([0, 1, 2, 3, 4])).tolist() == [0, 1, 1, 2, 2]


def test_loads_a_valid_dataset(tmp_path):
    _tiny_dataset(tmp_path)
    spec = load_dataset(tmp_path, "tiny")
    assert spec.n_classes == 2 and spec.reference == "a" and sorted(spec.scans) == ["a", "b"]


@pytest.mark.parametrize(
    "cfg, message",
    [
        ({"modality": "pet"}, "modality must be one of"),
        ({"reference": "zzz"}, "reference scan 'zzz' not found"),
        ({"label_map": {1: "right_lpm", 2: "left_es"}}, "must all be 2-class"),
        ({"label_map": {1: "right_lpm"}}, r"label_map lacks classes \['left_lpm'\]"),
        (
            {"label_map": {1.5: "right_lpm", 2: "left_lpm"}},
            "label_map key 1.5 must be a whole-number label id",
        ),
        ({"label_map": {True: "right_lpm", 2: "left_lpm"}}, "label_map key True must be a whole-number"),
        ({"label_map": {"1": "right_lpm", 1: "left_lpm"}}, "label id 1 appears twice in label_map"),
        ({"sequence": "ct"}, "does not fit modality"),
    ],
)
def test_invalid_dataset_descriptions(tmp_path, cfg, message):
    _tiny_dataset(tmp_path, **cfg)
    with pytest.raises(DatasetError, match=message) as info:
        load_dataset(tmp_path, "tiny")
    assert "dataset.yaml" in str(info.value)


def _check(tmp_path, annotation: np.ndarray, spacing=(1.0, 1.0, 3.0)):
    folder = _tiny_dataset(tmp_path)
    _write(annotation, folder / "annotation.nii.gz", spacing)
    spec = load_dataset(tmp_path, "tiny")
    return validate_annotation(
        read_image(spec.annotation), read_image(spec.scans["a"].image), spec, spec.annotation
    )


def test_annotation_rules(tmp_path):
    ok = np.zeros((6, 16, 16), np.uint8)
    ok[3, 4:8, 2:6], ok[3, 4:8, 10:14] = 1, 2
    result = _check(tmp_path, ok)
    assert result.seed_slice == 3 and result.classes_present == (1, 2)

    with pytest.raises(ScanError, match=r"annotation\.nii\.gz: annotation is empty"):
        _check(tmp_path, np.zeros_like(ok))
    several = ok.copy()
    several[0], several[5] = ok[3], ok[3]
    result = _check(tmp_path, several)  # each annotated slice a prompt; the primary nearest the middle
    assert result.annotated_slices == (0, 3, 5) and result.seed_slice == 3
    too_many = np.repeat(ok[3][None], 6, axis=0)
    with pytest.raises(ScanError, match=r"annotation covers 6 axial slices .*at most 5"):
        _check(tmp_path, too_many)
    half = several.copy()
    half[5][half[5] == 2] = 0
    with pytest.raises(
        ScanError, match=r"lacks class\(es\) \['left_lpm'\] on its annotated slice \(canonical"
    ):
        _check(tmp_path, half)
    one_side = ok.copy()
    one_side[one_side == 2] = 0
    with pytest.raises(ScanError, match=r"annotation lacks class\(es\) \['left_lpm'\]"):
        _check(tmp_path, one_side)
    foreign = ok.copy()
    foreign[3, 0, 0] = 9
    with pytest.raises(ScanError, match=r"label values \[9\] are not in the dataset's label_map"):
        _check(tmp_path, foreign)
    with pytest.raises(ScanError, match="annotation is not on the reference scan's grid"):
        _check(tmp_path, ok, spacing=(2.0, 1.0, 3.0))
    with pytest.raises(ScanError, match="annotation is not on the reference scan's grid"):
        _check(tmp_path, ok[:, :10])
    swapped = ok.copy()
    swapped[ok == 1], swapped[ok == 2] = 2, 1
    with pytest.raises(
        ScanError, match=r"annotation\.nii\.gz: the right-side classes lie on the patient's left"
    ):
        _check(tmp_path, swapped)


def test_annotation_outside_region(tmp_path):
    folder = _tiny_dataset(tmp_path)
    (folder / "regions.csv").write_text("scan,first_slice,last_slice\na,0,2\nb,5,1\n")
    spec = load_dataset(tmp_path, "tiny")
    assert spec.regions == {"a": Region(0, 2), "b": Region(5, 1)}
    with pytest.raises(ScanError, match=r"annotated slice 3 lies outside the reference's region 0\.\.2"):
        validate_annotation(
            read_image(spec.annotation), read_image(spec.scans["a"].image), spec, spec.annotation
        )


def test_the_reference_region_in_dataset_yaml_and_the_l4_l5_column_follow_one_schema(tmp_path):
    folder = _tiny_dataset(tmp_path, region={"first_slice": 5, "last_slice": 1, "l4_l5": 3})
    spec = load_dataset(tmp_path, "tiny")
    assert spec.reference_region == Region(5, 1, 3) and spec.regions == {"a": Region(5, 1, 3)}
    assert spec.region_origin("a") == f"{folder / 'dataset.yaml'} key region"
    # a regions.csv row overrides the found region of its scan, and the reference's too, which the others'
    # regions are then found from (they had been found from the yaml's discs the row corrected); l4_l5 may be
    # empty
    (folder / "regions.csv").write_text("scan,first_slice,last_slice,l4_l5\na,0,4,2\nb,1,5,\n")
    spec = load_dataset(tmp_path, "tiny")
    assert spec.regions == {"a": Region(0, 4, 2), "b": Region(1, 5)}
    assert spec.reference_region == Region(0, 4, 2)


def test_the_references_regions_row_alone_is_the_region_others_are_found_from(tmp_path):
    """Without a region in dataset.yaml the reference's row had cropped the reference alone: every scan without
    a row of its own stayed whole, without a warning, beside a cropped reference."""
    folder = _tiny_dataset(tmp_path)
    (folder / "regions.csv").write_text("scan,first_slice,last_slice,l4_l5\na,0,4,2\n")
    spec = load_dataset(tmp_path, "tiny")
    assert spec.regions == {"a": Region(0, 4, 2)} and spec.reference_region == Region(0, 4, 2)


@pytest.mark.parametrize(
    ("region", "message"),
    [
        (
            {"first_slice": 1, "last_slice": 5, "l4_l5": 5},
            r"key region, column l4_l5: the L4/L5 disc slice 5 must lie "
            r"strictly between the region's discs 1 and 5",
        ),
        ({"first_slice": 1}, r"key region, column last_slice: empty"),
        ({"first_slice": 1, "last_slice": "x"}, r"key region, column last_slice: 'x' is not an integer"),
        ({"first_slice": 1, "last_slice": 4, "l3": 2}, r"key region: unknown key 'l3'"),
        ({"first_slice": 1, "last_slice": 4, "scan": "b"}, r"key region: unknown key 'scan'"),
        ([1, 4], r"key region: expected first_slice, last_slice and optionally l4_l5"),
    ],
)
def test_a_bad_reference_region_refuses_the_dataset_naming_the_file(tmp_path, region, message):
    folder = _tiny_dataset(tmp_path, region=region)
    with pytest.raises(DatasetError, match=str(folder / "dataset.yaml") + " " + message):
        load_dataset(tmp_path, "tiny")


def test_a_bad_l4_l5_cell_excludes_its_scan_and_an_unknown_column_refuses_the_table(tmp_path):
    folder = _tiny_dataset(tmp_path)
    csv = folder / "regions.csv"
    csv.write_text("scan,first_slice,last_slice,l4_l5\na,0,4,2\nb,1,5,0\n")
    spec = load_dataset(tmp_path, "tiny")
    assert spec.regions == {"a": Region(0, 4, 2)}
    assert spec.excluded["b"] == (
        f"{csv} row 3, column l4_l5: the L4/L5 disc slice 0 must lie strictly between the region's discs 1 and 5"
    )
    csv.write_text("scan,first_slice,last_slice,l45\na,0,4,2\n")
    with pytest.raises(DatasetError, match=r"regions\.csv: unknown columns \['l45'\]"):
        load_dataset(tmp_path, "tiny")


def test_region_rows_are_named_by_their_line_in_the_file_and_a_stray_value_shifts_nothing(tmp_path):
    folder = _tiny_dataset(tmp_path)
    csv = folder / "regions.csv"
    # a blank line and a spreadsheet's empty row are skipped, and the rows keep their own line numbers
    csv.write_text("\ufeffscan,first_slice,last_slice\n\na,0,4\n,,\nb,2.9,5\n")
    spec = load_dataset(tmp_path, "tiny")
    assert spec.regions == {"a": Region(0, 4)} and spec.region_rows == {"a": 3}
    assert spec.excluded["b"] == f"{csv} row 5, column first_slice: '2.9' is not an integer slice index"
    # an L4/L5 value without its header: the row is refused, not read one column to the left
    csv.write_text("scan,first_slice,last_slice\na,0,4\nb,1,5,2\n")
    spec = load_dataset(tmp_path, "tiny")
    assert spec.regions == {"a": Region(0, 4)}
    assert (
        spec.excluded["b"]
        == f"{csv} row 3: 4 values where the header names 3 columns (scan,first_slice,last_slice)"
    )
    # a spreadsheet's used range wider than the table: empty header cells and empty cells past it are no values
    csv.write_text("scan,first_slice,last_slice,,\na,0,4,,\nb,1,5,\n")
    spec = load_dataset(tmp_path, "tiny")
    assert spec.regions == {"a": Region(0, 4), "b": Region(1, 5)} and not spec.excluded
    # a row may end before an optional column, never before a required one
    csv.write_text("scan,first_slice,last_slice,l4_l5\na,0,4\nb,1,5,3\n")
    assert load_dataset(tmp_path, "tiny").regions == {"a": Region(0, 4), "b": Region(1, 5, 3)}
    csv.write_text("scan,first_slice,last_slice,l4_l5\na,0,4\nb,1\n")
    spec = load_dataset(tmp_path, "tiny")
    assert spec.regions == {"a": Region(0, 4)}
    assert spec.excluded["b"] == (
        f"{csv} row 3: 2 values where the header names 4 columns (scan,first_slice,last_slice,l4_l5)"
    )
    csv.write_text("scan,first_slice,last_slice\na,0,4\nb,\u0663,4\n")  # an Arabic-Indic three
    assert "is not an integer slice index" in load_dataset(tmp_path, "tiny").excluded["b"]


def test_an_annotation_outside_the_yaml_region_names_dataset_yaml(tmp_path):
    folder = _tiny_dataset(tmp_path, region={"first_slice": 0, "last_slice": 2})
    spec = load_dataset(tmp_path, "tiny")
    with pytest.raises(
        ScanError, match=r"lies outside the reference's region 0\.\.2 \(.*dataset\.yaml key region\)"
    ):
        validate_annotation(
            read_image(spec.annotation), read_image(spec.scans["a"].image), spec, spec.annotation
        )
    assert folder.exists()


def test_dataset_yaml_numbers_are_read_as_written_not_as_yaml_1_1_octal_hex_or_base_60(tmp_path):
    folder = _tiny_dataset(tmp_path)
    _write(np.zeros((6, 16, 16), np.float32), folder / "scans" / "007.nii.gz")
    description = "modality: mri\nsequence: t2\nreference: 007\nlabel_map: {010: right_lpm, 011: left_lpm}\n"
    (folder / "dataset.yaml").write_text(
        description + "region: {first_slice: 010, last_slice: 014, l4_l5: 012}\n"
    )
    spec = load_dataset(tmp_path, "tiny")
    # YAML 1.1 had read these as reference 7 (not found), label ids 8 and 9, and region 8..12 with L4/L5 at 10
    assert spec.reference == "007"
    assert spec.label_map == {10: 1, 11: 2}
    assert spec.regions["007"] == Region(10, 14, 12)

    for written, shown in (("0x0A", "'0x0A'"), ("1:20", "'1:20'"), ("1_0", "'1_0'")):
        (folder / "dataset.yaml").write_text(
            description + f"region: {{first_slice: 2, last_slice: {written}}}\n"
        )
        with pytest.raises(DatasetError, match=rf"key region, column last_slice: {shown} is not an integer"):
            load_dataset(tmp_path, "tiny")


@pytest.mark.parametrize("dixon", [False, True])
def test_two_files_of_one_scan_exclude_that_scan_naming_both(tmp_path, dixon):
    """``a.nii`` beside ``a.nii.gz`` (or a second fat image): the later name in sort order had silently won."""
    from nnsam2_assets.ingest.convention import discover_scans

    scans = tmp_path / "ds" / "scans"
    image = np.zeros((4, 8, 8), np.float32)
    names = (
        ["a_water.nii.gz", "a_fat.nii", "a_fat.nii.gz", "b_water.nii.gz", "b_fat.nii.gz"]
        if dixon
        else [
            "a.nii",
            "a.nii.gz",
            "b.nii.gz",
        ]
    )
    for name in names:
        _write(image, scans / name)
    found, excluded = discover_scans(tmp_path / "ds", is_dixon=dixon, roots=(tmp_path.resolve(),))
    assert sorted(found) == ["b"]
    second = "a_fat.nii.gz" if dixon else "a.nii.gz"
    first = "a_fat.nii" if dixon else "a.nii"
    assert excluded["a"] == f"{scans / second}: {first} is the same scan 'a': keep one of the two"


def test_a_correction_or_expert_file_that_names_no_scan_is_reported_not_skipped_silently(tmp_path):
    folder = write_tiny_dataset(tmp_path, "ds", 2)
    (folder / "corrections").mkdir()
    for name in ("Segmentation.seg.nrrd", "subj01.nrrd", "subj01.nii.gz", ".DS_Store"):
        (folder / "corrections" / name).write_bytes(b"x")
    (folder / "experts" / "SUBJ00.nii.gz").write_bytes(b"x")
    warnings = load_dataset(tmp_path, "ds").warnings
    named = sorted(Path(line.split(": names no scan")[0]).relative_to(folder).as_posix() for line in warnings)
    assert named == ["corrections/Segmentation.seg.nrrd", "corrections/subj01.nrrd", "experts/SUBJ00.nii.gz"]
    assert all("names no scan" in line and "not read" in line for line in warnings)
    # the file a scan does read under another name (what a case-insensitive file system makes of SUBJ00.nii.gz
    # beside scan subj00; a hard link here) is not reported as unread
    (folder / "experts" / "SUBJ00.nii.gz").unlink()
    (folder / "experts" / "SUBJ00.nii.gz").hardlink_to(folder / "experts" / "subj00.nii.gz")
    assert not any("SUBJ00" in line for line in load_dataset(tmp_path, "ds").warnings)


def test_the_manifest_names_where_a_kept_region_comes_from_now(tmp_path):
    """The same region moved from regions.csv to dataset.yaml is the same crop, so the scan is not ingested
    again; its manifest row had gone on saying regions.csv."""
    from nnsam2_assets.ingest.scans import ingest_scans, read_manifest
    from nnsam2_assets.testing.direct import DirectRun

    folder = write_tiny_dataset(tmp_path / "data", "ds", 2)
    run = DirectRun(tmp_path / "data", tmp_path / "storage", ["ds"])
    layout = run.layout("ds")
    ingest_scans(load_dataset(run.data_root, "ds"), layout)
    assert read_manifest(layout).loc["subj00", "region_source"] == "regions.csv"
    rows = (folder / "regions.csv").read_text().splitlines()
    (folder / "regions.csv").write_text("\n".join(r for r in rows if not r.startswith("subj00,")) + "\n")
    again = ingest_scans(load_dataset(run.data_root, "ds"), layout)
    assert again.computed == 0  # dataset.yaml holds the same region: the same crop
    assert read_manifest(layout).loc["subj00", "region_source"] == "dataset.yaml"


def test_a_region_beyond_the_scan_names_its_file_and_row_whatever_the_folders_are_called(tmp_path):
    """The file was cut out of the message at " row ", so a folder named "my row scans" garbled it."""
    from nnsam2_assets.ingest.scans import ingest_scans, read_manifest
    from nnsam2_assets.testing.direct import DirectRun

    root = tmp_path / "my row scans"
    folder = write_tiny_dataset(root, "ds", 2)
    (folder / "regions.csv").write_text("scan,first_slice,last_slice\nsubj01,1,999\n")
    run = DirectRun(root, tmp_path / "storage", ["ds"])
    ingest_scans(load_dataset(root, "ds"), run.layout("ds"))
    error = read_manifest(run.layout("ds")).loc["subj01", "error"]
    assert error.startswith(
        f"{folder / 'regions.csv'}: row 2, columns first_slice/last_slice: slices 1..999 lie"
    )


def test_a_misnamed_dixon_file_never_deletes_another_scans_fat_image(tmp_path):
    """``subj01_fat_water.nii.gz`` is excluded as scan ``subj01_fat``; removing that name's outputs had deleted
    ``scans/subj01_fat.nii.gz``, which is scan subj01's stored fat image, while its manifest row said ok."""
    import shutil

    from nnsam2_assets.ingest.scans import ingest_scans, read_manifest
    from nnsam2_assets.testing.direct import DirectRun

    folder = write_tiny_dataset(tmp_path / "data", "ds", 2)
    run = DirectRun(tmp_path / "data", tmp_path / "storage", ["ds"])
    layout = run.layout("ds")
    ingest_scans(load_dataset(run.data_root, "ds"), layout)
    assert layout.scan_fat("subj01").exists()
    shutil.copy(folder / "scans" / "subj01_water.nii.gz", folder / "scans" / "subj01_fat_water.nii.gz")
    spec = load_dataset(run.data_root, "ds")
    assert "subj01_fat" in spec.excluded
    ingest_scans(spec, layout)
    assert read_manifest(layout).loc["subj01", "status"] == "ok" and layout.scan_fat("subj01").exists()


def test_scans_whose_ids_differ_only_in_case_are_all_excluded(tmp_path):
    """On a case-insensitive file system (macOS, Windows) ``S1`` and ``s1`` are stored as one file."""
    import shutil

    folder = write_tiny_dataset(tmp_path, "ds", 3)
    for kind in ("water", "fat"):
        shutil.copy(folder / "scans" / f"subj02_{kind}.nii.gz", folder / "scans" / f"SUBJ02_{kind}.nii.gz")
    spec = load_dataset(tmp_path, "ds")
    assert "subj02" not in spec.scans and "SUBJ02" not in spec.scans and "subj01" in spec.scans
    assert (
        "differ only in case" in spec.excluded["subj02"] and "differ only in case" in spec.excluded["SUBJ02"]
    )


def test_an_expert_file_of_fractional_labels_is_ignored_with_the_reason(tmp_path):
    """Expert labels were cast to integers: 1.5 became 1 and 0.6 became 0, and the comparison with the
    expert ran on other voxels than the expert drew, without a word."""
    from nnsam2_assets.ingest.scans import ingest_scans, read_manifest
    from nnsam2_assets.testing.direct import DirectRun

    folder = write_tiny_dataset(tmp_path / "data", "ds", 2)
    expert = folder / "experts" / "subj01.nii.gz"
    labels = read_image(expert)
    values = sitk.GetArrayFromImage(labels).astype(np.float32)
    values[values == 1] = 1.5  # an interpolating resampler's edge
    resampled = sitk.GetImageFromArray(values)
    resampled.CopyInformation(labels)
    sitk.WriteImage(resampled, str(expert))
    run = DirectRun(tmp_path / "data", tmp_path / "storage", ["ds"])
    ingest_scans(load_dataset(run.data_root, "ds"), run.layout("ds"))
    row = read_manifest(run.layout("ds")).loc["subj01"]
    assert row.status == "ok" and not row.has_expert
    assert f"expert labels ignored: {expert}: label values [1.5] are not whole numbers" in row.warnings


def test_a_windows_regions_csv_is_read_and_a_quoted_line_break_keeps_the_rows_first_line(tmp_path):
    """Excel on Windows saves "CSV (Comma delimited)" in Windows-1252: a name with an umlaut made the whole
    table unreadable. A quoted value spanning lines was named by its last line, not the line the row starts on."""
    folder = _tiny_dataset(tmp_path)
    csv = folder / "regions.csv"
    csv.write_bytes("scan,first_slice,last_slice\na,0,4\nb\u00fc,1,5\n".encode("cp1252"))
    spec = load_dataset(tmp_path, "tiny")
    assert spec.regions == {"a": Region(0, 4)}
    assert f"{csv} row 3: no scan named 'b\u00fc'" in " ".join(spec.warnings)
    csv.write_bytes(b"scan,first_slice,last_slice\na,0,4\nb,\x81,5\n")  # undefined in Windows-1252 too
    with pytest.raises(DatasetError, match="unreadable region table"):
        load_dataset(tmp_path, "tiny")
    csv.write_text('scan,first_slice,last_slice\na,"0\n",4\nb,x,5\n')
    spec = load_dataset(tmp_path, "tiny")
    assert spec.region_rows == {"a": 2}
    assert spec.excluded["b"] == f"{csv} row 4, column first_slice: 'x' is not an integer slice index"
