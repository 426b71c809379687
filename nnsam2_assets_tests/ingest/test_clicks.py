"""Click prompts: the Slicer markups and CSV readers, their errors, the weight-free slice mask on real TUM
slices, and a click dataset through annotation and propagation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from nnsam2_assets.core.imaging import ScanError
from nnsam2_assets.core.labels import class_names, mean_dice, to_class_space
from nnsam2_assets.ingest.annotation import read_annotation_clicks, read_annotation_meta
from nnsam2_assets.ingest.click_masks import mask_from_clicks
from nnsam2_assets.ingest.clicks import Click, place_clicks, read_clicks
from nnsam2_assets.testing.clicks import clicks_from_labels, write_click_csv, write_markups
from nnsam2_assets.testing.direct import STEPS, DirectRun
from nnsam2_assets.testing.realdata import TUM, tum_click_dataset

NAMES = class_names(4)


def _grid() -> sitk.Image:
    image = sitk.Image(40, 30, 6, sitk.sitkFloat32)
    image.SetSpacing((0.8, 0.8, 4.0))
    image.SetOrigin((-10.0, 5.0, 100.0))
    return image


def _clicks_on(image: sitk.Image, z: int, pixels: list[tuple[int, int, int, bool]]) -> list[Click]:
    return [Click(c, image.TransformIndexToPhysicalPoint((x, y, z)), p) for c, x, y, p in pixels]


PIXELS = [(1, 5, 10, True), (2, 12, 10, True), (3, 25, 10, True), (4, 33, 10, True), (2, 20, 20, False)]


@pytest.mark.parametrize("fmt", ["csv", "mrk-lps", "mrk-ras"])
def test_markups_and_csv_give_the_same_pixels(tmp_path, fmt):
    image = _grid()
    clicks = _clicks_on(image, 3, PIXELS)
    if fmt == "csv":
        path = write_click_csv(clicks, 4, tmp_path / "annotation.csv")
    else:
        path = write_markups(clicks, 4, tmp_path / "annotation.mrk.json", fmt.split("-")[1].upper())
    placed = place_clicks(read_clicks(path, NAMES), image, path, "the reference")
    assert placed.slice == 3
    assert list(zip(placed.cols, placed.rows, strict=True)) == [(x, y) for _, x, y, _ in PIXELS]
    assert placed.class_ids == (1, 2, 3, 4, 2) and placed.positive == (True, True, True, True, False)
    points, labels = placed.for_class(2)
    np.testing.assert_array_equal(points, [[12, 10], [20, 20]])
    np.testing.assert_array_equal(labels, [1, 0])


def test_a_spreadsheet_saved_click_csv_reads_and_names_the_files_own_line(tmp_path):
    image = _grid()
    path = write_click_csv(_clicks_on(image, 3, PIXELS), 4, tmp_path / "annotation.csv")
    lines = path.read_text().splitlines()
    path.write_text(
        "\ufeff" + "\n\n".join(lines) + "\n", encoding="utf-8"
    )  # a BOM, a blank line between rows
    placed = place_clicks(read_clicks(path, NAMES), image, path, "the reference")
    assert placed.class_ids == (1, 2, 3, 4, 2)
    path.write_text("\n".join([*lines, ",,,,", " , , , , "]) + "\n")  # filler rows a spreadsheet keeps
    assert place_clicks(read_clicks(path, NAMES), image, path, "the reference").class_ids == (1, 2, 3, 4, 2)
    lines[3] = lines[3].replace("true", "maybe").replace("True", "maybe")
    path.write_text("\n\n".join(lines) + "\n")
    with pytest.raises(ScanError, match=r"line 7: positive must be true or false"):
        read_clicks(path, NAMES)


def test_a_markups_list_name_gives_the_class_of_unnamed_points(tmp_path):
    image = _grid()
    lists = []
    for c, x, y, _ in PIXELS[:4]:
        point = image.TransformIndexToPhysicalPoint((x, y, 2))
        lists.append(
            {"type": "Fiducial", "name": NAMES[c - 1], "controlPoints": [{"label": "F-1", "position": point}]}
        )
    path = tmp_path / "a.mrk.json"
    path.write_text(json.dumps({"markups": lists}))
    assert [c.class_id for c in read_clicks(path, NAMES)] == [1, 2, 3, 4]


def test_a_markups_file_as_slicer_saves_it_reads_its_classes_from_the_point_labels(tmp_path):
    """Slicer writes no list name, labels a list's points "%N-%d" after the list (right_es-1, -right_mf-2
    for a list named -right_mf) and writes a listed but unplaced point with an empty position: once every
    such file was refused ("unknown class 'right_es-1'"; "position must be 3 numbers")."""
    image = _grid()
    lists = []
    for c, x, y, positive in PIXELS:
        name = NAMES[c - 1] if positive else f"-{NAMES[c - 1]}"
        point = image.TransformIndexToPhysicalPoint((x, y, 2))
        points = [
            {"id": "1", "label": f"{name}-1", "position": list(point), "positionStatus": "defined"},
            {"id": "2", "label": f"{name}-2", "position": "", "positionStatus": "undefined"},
        ]
        lists.append(
            {"type": "Fiducial", "coordinateSystem": "LPS", "labelFormat": "%N-%d", "controlPoints": points}
        )
    path = tmp_path / "a.mrk.json"
    path.write_text(json.dumps({"markups": lists}))
    clicks = read_clicks(path, NAMES)
    assert [(c.class_id, c.positive) for c in clicks] == [(c, p) for c, _, _, p in PIXELS]


def test_a_markups_list_name_wins_over_numbered_point_labels(tmp_path):
    """Points numbered 1, 2 in a list named left_es are left_es, not classes 1 and 2."""
    image = _grid()
    right = [{"label": "1", "position": image.TransformIndexToPhysicalPoint((5, 10, 2))}]
    left = [
        {"label": str(i), "position": image.TransformIndexToPhysicalPoint((33, 10 + i, 2))} for i in (1, 2)
    ]
    lists = [{"type": "Fiducial", "name": NAMES[0], "controlPoints": right}]
    lists += [
        {"type": "Fiducial", "name": n, "controlPoints": [{"label": "7", "position": right[0]["position"]}]}
        for n in NAMES[1:3]
    ]
    lists.append({"type": "Fiducial", "name": NAMES[3], "controlPoints": left})
    path = tmp_path / "a.mrk.json"
    path.write_text(json.dumps({"markups": lists}))
    assert [c.class_id for c in read_clicks(path, NAMES)] == [1, 2, 3, 4, 4]


def _csv(tmp_path, rows: list[str], header: str = "class,x,y,z,positive"):
    path = tmp_path / "annotation.csv"
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def _rows(image: sitk.Image, z: int = 2, extra: list[str] | None = None) -> list[str]:
    rows = []
    for c, x, y, p in PIXELS:
        px, py, pz = image.TransformIndexToPhysicalPoint((x, y, z))
        rows.append(f"{NAMES[c - 1]},{px},{py},{pz},{str(p).lower()}")
    return rows + (extra or [])


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("unknown class", "unknown class 'psoas'"),
        ("no positive", "no positive point for class(es) ['left_es']"),
        ("outside in-plane", "outside the reference's in-plane extent"),
        ("outside axially", "outside the reference along the axial axis"),
        ("two slices", "the points lie on 2 axial slices [2, 4]"),
        ("bad flag", "positive must be true or false"),
        ("missing column", "lacks column(s) ['positive']"),
        ("no points", "has no points"),
    ],
)
def test_bad_click_files_are_refused_naming_the_file(tmp_path, case, reason):
    image = _grid()
    rows = _rows(image)
    header = "class,x,y,z,positive"
    if case == "unknown class":
        rows.append("psoas,0,10,108,true")
    elif case == "no positive":
        rows = [r for r in rows if not r.startswith("left_es")] + [
            r.replace("true", "false") for r in rows if r.startswith("left_es")
        ]
    elif case == "outside in-plane":
        rows.append("right_es,500,10,108,true")
    elif case == "outside axially":
        rows.append("right_es,0,10,500,true")
    elif case == "two slices":
        rows += _rows(image, z=4)[:1]
    elif case == "bad flag":
        rows.append("right_es,0,10,108,maybe")
    elif case == "missing column":
        header, rows = "class,x,y,z", [r.rsplit(",", 1)[0] for r in rows]
    elif case == "no points":
        rows = []
    path = _csv(tmp_path, rows, header)
    with pytest.raises(ScanError) as err:
        place_clicks(read_clicks(path, NAMES), image, path, "the reference")
    assert str(path) in str(err.value) and reason in str(err.value)


@pytest.mark.parametrize("case", ["TUM01", "TUM02"])
def test_clicks_from_the_expert_make_a_slice_mask_close_to_the_expert(case):
    """Weight-free: 5 positive and 2 negative points per class on the middle slice (real Dixon water)."""
    image = sitk.ReadImage(str(TUM / f"{case}_water.nii.gz"))
    labels = sitk.ReadImage(str(TUM / f"{case}_label_watergrid.nii.gz"))
    z = labels.GetSize()[2] // 2
    path = TUM / "unused.csv"
    placed = place_clicks(clicks_from_labels(labels, z), labels, path, case)
    mask = mask_from_clicks(sitk.GetArrayFromImage(image), placed, 4, "mri", image.GetSpacing()[:2])
    truth = sitk.GetArrayFromImage(labels)[z]
    dice2 = mean_dice(to_class_space(mask, 4, 2), to_class_space(truth, 4, 2), 2)
    dice4 = mean_dice(mask, truth, 4)
    assert dice2 >= 0.85 and dice4 >= 0.75, (dice2, dice4)


def test_the_click_walker_weighs_intensity_steps_per_mm_on_rectangular_pixels(monkeypatch):
    """The seeds and the ring were placed in mm, the walker took every pixel step as one unit. Square pixels
    (TUM's) walk exactly as before."""
    from nnsam2_assets.core import walker
    from nnsam2_assets.testing.spies import record_walker_spacing

    image = sitk.ReadImage(str(TUM / "TUM02_water.nii.gz"))
    labels = sitk.ReadImage(str(TUM / "TUM02_label_watergrid.nii.gz"))
    z = labels.GetSize()[2] // 2
    placed = place_clicks(clicks_from_labels(labels, z), labels, TUM / "unused.csv", "TUM02")
    volume = sitk.GetArrayFromImage(image)
    before = mask_from_clicks(volume, placed, 4, "mri", image.GetSpacing()[:2])
    real = walker.random_walker
    seen = record_walker_spacing(monkeypatch)
    mask_from_clicks(volume, placed, 4, "mri", (0.5, 1.0))  # columns 0.5 mm, rows 1 mm
    assert seen == [(2.0, 1.0)]

    def as_square(*args, **kwargs):  # the walk as it was, with no spacing
        kwargs.pop("spacing")
        return real(*args, **kwargs)

    monkeypatch.setattr(walker, "random_walker", as_square)
    assert np.array_equal(before, mask_from_clicks(volume, placed, 4, "mri", image.GetSpacing()[:2]))


def test_a_click_dataset_is_annotated_and_propagated(tmp_path):
    data, storage = tmp_path / "data", tmp_path / "storage"
    tum_click_dataset(data, "clicks", "TUM02", "mrk")
    run = DirectRun(data, storage, ["clicks"])
    for step in ("scans", "reference_annotation", "propagated_masks"):
        STEPS[step](run, "clicks")
    layout = run.layout("clicks")
    meta = read_annotation_meta(layout)
    clicks = read_annotation_clicks(layout)
    assert meta["prompt"] == "clicks" and meta["n_clicks"] == len(clicks.rows) == 28
    annotation = sitk.GetArrayFromImage(sitk.ReadImage(str(layout.annotation)))
    assert set(np.flatnonzero(annotation.reshape(annotation.shape[0], -1).any(1))) == {clicks.slice}
    target = sitk.GetArrayFromImage(sitk.ReadImage(str(layout.masks("TUM01"))))
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(layout.scan_expert("TUM01"))))
    assert mean_dice(to_class_space(target, 4, 2), to_class_space(truth, 4, 2), 2) >= 0.85


def test_clicks_with_the_sides_swapped_are_refused_with_what_is_likely_wrong_in_a_click_file(tmp_path):
    """A click file has no label_map: the message names the click classes and RAS coordinates instead."""
    data = tmp_path / "data"
    folder = tum_click_dataset(data, "clicks", "TUM02", "csv")
    csv_path = folder / "annotation.csv"
    flip = {"right": "left", "left": "right"}
    rows = csv_path.read_text().splitlines()
    swapped = [rows[0]] + [flip[r.split("_", 1)[0]] + "_" + r.split("_", 1)[1] for r in rows[1:]]
    csv_path.write_text("\n".join(swapped) + "\n")
    run = DirectRun(data, tmp_path / "storage", ["clicks"])
    STEPS["scans"](run, "clicks")
    with pytest.raises(
        ScanError, match=r"annotation\.csv: the right-side classes lie on the patient's left"
    ) as err:
        STEPS["reference_annotation"](run, "clicks")
    assert "swapped in the click classes, or the points are in RAS" in str(err.value)
    assert "label_map" not in str(err.value)


@pytest.mark.parametrize(
    ("markups", "reason"),
    [
        (
            {"markups": [{"type": "Fiducial", "controlPoints": [{"label": "right_es", "position": [1, 2]}]}]},
            "position must be 3 numbers",
        ),
        (
            {"markups": [{"type": "Fiducial", "controlPoints": [{"label": "right_es"}]}]},
            "position must be 3 numbers",
        ),
        ({"markups": [{"type": "Fiducial", "controlPoints": ["x"]}]}, "is not a control point"),
        ({"markups": ["x"]}, "is not a markup"),
        ({"markups": [{"type": "Line", "controlPoints": []}]}, "click prompts are Fiducial points"),
        ({"nothing": 1}, "not a 3D Slicer markups file"),
    ],
)
def test_malformed_markups_are_refused_naming_the_file(tmp_path, markups, reason):
    path = tmp_path / "annotation.mrk.json"
    path.write_text(json.dumps(markups))
    with pytest.raises(ScanError) as err:
        read_clicks(path, NAMES)
    assert str(path) in str(err.value) and reason in str(err.value)


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("annotation.csv", "class,x,y,z,positive\n\u00b2,1,2,3,true\n"),  # a superscript two is a "digit"
        ("annotation.mrk.json", "[" * 50000 + "]" * 50000),
        (
            "annotation.mrk.json",
            '{"markups": [{"controlPoints": [{"position": [' + "9" * 5000 + ", 0, 0]}]}]}",
        ),
    ],
)
def test_a_hostile_click_file_is_refused_naming_it(tmp_path, name, text):
    """They raised a bare ValueError or RecursionError that named no file and failed the dataset's step."""
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ScanError, match=rf"^{path}: ") as refused:
        read_clicks(path, NAMES)
    assert str(refused.value).count(str(path)) == 1  # named once, not wrapped in a second message


def test_a_click_files_own_error_is_not_wrapped_again(tmp_path):
    path = tmp_path / "annotation.csv"
    path.write_text("class,x,y,z,positive\nbogus,1,2,3,true\n")
    with pytest.raises(ScanError) as refused:
        read_clicks(path, NAMES)
    assert str(refused.value).startswith(f"{path}: line 2: unknown class 'bogus'")
