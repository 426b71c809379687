"""Click prompts: positive and negative points per class on one axial slice of the reference scan, in place
of a drawn annotation.

Two file formats, both in physical millimetres:

- a 3D Slicer markups file (``*.mrk.json``): fiducial lists of control points, each with a ``label`` and a
  ``position`` in the file's ``coordinateSystem`` (``LPS``, Slicer's file default, or ``RAS``);
- a CSV (``*.csv``) with columns ``class, x, y, z, positive``: x, y, z in LPS (ITK's physical space, the one
  the scan file's origin and direction are written in), ``positive`` true/false (also 1/0, yes/no).

A point's class is one of the dataset's class names (``right_es`` ...) or its id. In a markups file a label
with a leading ``-`` (``-right_mf``) is a negative point. Slicer labels a list's points after the list
(``right_mf-1``, ``right_mf-2``: the class is the list's name), and a label that names no class takes the class
of the list's ``name`` where the file has one. Points Slicer lists but never placed are skipped. Every point must lie on one axial slice of the reference (within half a slice spacing) inside
its region and in-plane extent, and every class needs at least one positive point.

The clicks become a slice mask (``ingest.click_masks``): the weight-free backend propagates that mask;
the SAM2 backend prompts its video predictor with the points themselves.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from nnsam2_assets.core.imaging import ScanError

CLICK_SUFFIXES = (".mrk.json", ".csv")
_TRUE = {"1", "true", "yes", "y", "positive", "+"}
_FALSE = {"0", "false", "no", "n", "negative", "-"}


@dataclass(frozen=True)
class Click:
    class_id: int
    point_lps: tuple[float, float, float]  # physical mm, LPS
    positive: bool


@dataclass(frozen=True)
class SliceClicks:
    """Clicks placed on one axial slice of a canonical image: pixel rows and columns of that slice."""

    slice: int
    rows: tuple[int, ...]
    cols: tuple[int, ...]
    class_ids: tuple[int, ...]
    positive: tuple[bool, ...]

    def for_class(self, class_id: int) -> tuple[np.ndarray, np.ndarray]:
        """(points as (x=col, y=row) pairs, labels 1 positive / 0 negative) of one class."""
        pick = [i for i, c in enumerate(self.class_ids) if c == class_id]
        points = np.array([[self.cols[i], self.rows[i]] for i in pick], dtype=np.float32).reshape(-1, 2)
        labels = np.array([int(self.positive[i]) for i in pick], dtype=np.int32)
        return points, labels

    def to_json(self) -> dict:
        return {
            "slice": self.slice,
            "points": [
                {"row": r, "col": c, "class_id": k, "positive": p}
                for r, c, k, p in zip(self.rows, self.cols, self.class_ids, self.positive, strict=True)
            ],
        }

    @classmethod
    def from_json(cls, data: dict) -> SliceClicks:
        points = data["points"]
        return cls(
            int(data["slice"]),
            tuple(int(p["row"]) for p in points),
            tuple(int(p["col"]) for p in points),
            tuple(int(p["class_id"]) for p in points),
            tuple(bool(p["positive"]) for p in points),
        )


def is_click_file(path: Path | str) -> bool:
    return str(path).lower().endswith(CLICK_SUFFIXES)


def read_clicks(path: Path, class_names: tuple[str, ...]) -> list[Click]:
    """The clicks of a ``.mrk.json`` or ``.csv`` file, classes resolved; clear errors naming the file."""
    path = Path(path)
    reader = _read_markups if str(path).lower().endswith(".mrk.json") else _read_csv
    try:
        clicks = reader(path, class_names)
    except ScanError:  # already names the file and the line
        raise
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, csv.Error) as exc:
        raise ScanError(path, f"cannot read the click file: {exc}") from exc
    except RecursionError as exc:  # thousands of nested brackets
        raise ScanError(path, "cannot read the click file: nested too deeply") from exc
    except ValueError as exc:  # a number of thousands of digits, a value of the wrong kind
        raise ScanError(path, f"cannot read the click file: {exc}") from exc
    if not clicks:
        raise ScanError(path, "the click file has no points")
    positives = {c.class_id for c in clicks if c.positive}
    missing = [name for i, name in enumerate(class_names, start=1) if i not in positives]
    if missing:
        raise ScanError(path, f"no positive point for class(es) {missing}: each class needs at least one")
    return clicks


def _class_id(token: str, class_names: tuple[str, ...]) -> int | None:
    token = token.strip()
    if token in class_names:
        return class_names.index(token) + 1
    if token.isascii() and token.isdigit() and 1 <= int(token) <= len(class_names):  # "²" is a digit too
        return int(token)
    return None


def _point_class(token: str, list_name: str, class_names: tuple[str, ...]) -> int | None:
    """A markups point's class: its label as a class name; the name Slicer numbers its points from (labels
    "%N-%d": ``right_es-3``; Slicer writes no list name to the file); the list's name in a file that has one;
    then the label as a class id."""
    numbered = _SLICER_NUMBERED.fullmatch(token.strip())
    for candidate in (token, numbered and numbered["name"], list_name):
        if candidate and candidate.strip() in class_names:
            return class_names.index(candidate.strip()) + 1
    return _class_id(token, class_names)


_SLICER_NUMBERED = re.compile(r"(?P<name>.+)-[0-9]+")


def _unknown(path: Path, token: str, where: str, class_names: tuple[str, ...]) -> ScanError:
    return ScanError(
        path,
        f"{where}: unknown class {token!r} (expected one of {list(class_names)} or 1..{len(class_names)})",
    )


def _read_markups(path: Path, class_names: tuple[str, ...]) -> list[Click]:
    doc = json.loads(path.read_text())
    markups = doc.get("markups") if isinstance(doc, dict) else None
    if not isinstance(markups, list):
        raise ScanError(path, "not a 3D Slicer markups file: no 'markups' list")
    clicks = []
    for m, markup in enumerate(markups):
        if not isinstance(markup, dict) or not isinstance(markup.get("controlPoints", []), list):
            raise ScanError(path, f"markup {m} is not a markup with a list of controlPoints")
        if markup.get("type", "Fiducial") != "Fiducial":
            raise ScanError(
                path, f"markup {m} is a {markup.get('type')!r}; click prompts are Fiducial points"
            )
        system = str(markup.get("coordinateSystem", "LPS")).upper()
        if system not in ("LPS", "RAS"):
            raise ScanError(path, f"markup {m}: unknown coordinateSystem {system!r} (LPS or RAS)")
        for p, point in enumerate(markup.get("controlPoints", [])):
            if not isinstance(point, dict):
                raise ScanError(path, f"markup {m} point {p} is not a control point")
            if str(point.get("positionStatus", "defined")) != "defined":
                continue  # a point Slicer lists but was never placed (written with "position": "")
            label = str(point.get("label", ""))
            positive = not label.startswith("-")
            class_id = _point_class(label.lstrip("-"), str(markup.get("name", "")), class_names)
            if class_id is None:
                raise _unknown(path, label, f"markup {m} point {p}", class_names)
            try:
                x, y, z = (float(v) for v in point["position"])
            except (KeyError, TypeError, ValueError) as exc:
                raise ScanError(path, f"markup {m} point {p}: position must be 3 numbers ({exc!r})") from exc
            if system == "RAS":
                x, y = -x, -y
            clicks.append(Click(class_id, (x, y, z), positive))
    return clicks


def _read_csv(path: Path, class_names: tuple[str, ...]) -> list[Click]:
    with path.open(newline="", encoding="utf-8-sig") as f:  # -sig: a spreadsheet's byte-order mark
        reader = csv.DictReader(f)
        columns = {c.strip().lower() for c in reader.fieldnames or []}
        missing = {"class", "x", "y", "z", "positive"} - columns
        if missing:
            raise ScanError(path, f"click CSV lacks column(s) {sorted(missing)} (class, x, y, z, positive)")
        clicks = []
        for row in reader:
            line = reader.line_num  # the file's own line: blank lines are skipped, not counted away
            row = {k.strip().lower(): (v or "").strip() for k, v in row.items() if k}
            if not any(row.values()):  # a spreadsheet's filler row (",,,,"), as regions.csv skips it
                continue
            class_id = _class_id(row["class"], class_names)
            if class_id is None:
                raise _unknown(path, row["class"], f"line {line}", class_names)
            flag = row["positive"].lower()
            if flag not in _TRUE | _FALSE:
                raise ScanError(path, f"line {line}: positive must be true or false, got {row['positive']!r}")
            try:
                point = (float(row["x"]), float(row["y"]), float(row["z"]))
            except ValueError as exc:
                raise ScanError(path, f"line {line}: x, y, z must be numbers ({exc})") from exc
            clicks.append(Click(class_id, point, flag in _TRUE))
    return clicks


def place_clicks(clicks: list[Click], image: sitk.Image, path: Path, what: str) -> SliceClicks:
    """The clicks as pixels of one axial slice of ``image`` (a canonical crop: array z is axial); every point
    must fall inside it and on one slice, within half a slice spacing of the slice's centre."""
    size = image.GetSize()
    rows, cols, slices = [], [], []
    for i, click in enumerate(clicks):
        x, y, z = image.TransformPhysicalPointToContinuousIndex(click.point_lps)
        where = f"point {i + 1} ({', '.join(f'{v:.1f}' for v in click.point_lps)} mm LPS)"
        if not (-0.5 <= x < size[0] - 0.5 and -0.5 <= y < size[1] - 0.5):
            raise ScanError(path, f"{where} lies outside {what}'s in-plane extent")
        if not -0.5 <= z < size[2] - 0.5:
            raise ScanError(path, f"{where} lies outside {what} along the axial axis (slice {z:.1f})")
        rows.append(int(round(y)))
        cols.append(int(round(x)))
        slices.append(int(round(z)))
    if len(set(slices)) > 1:
        raise ScanError(
            path, f"the points lie on {len(set(slices))} axial slices {sorted(set(slices))}: click on one"
        )
    return SliceClicks(
        slices[0],
        tuple(rows),
        tuple(cols),
        tuple(c.class_id for c in clicks),
        tuple(c.positive for c in clicks),
    )
