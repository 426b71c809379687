"""Click prompts made from expert labels, as a user would place them: per class the point deepest inside the
muscle plus a few interior points, and negative points just outside the muscles. For tests and the click
benchmark; written as a ``.mrk.json`` (Slicer markups) or a click CSV."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from nnsam2_assets.core.labels import class_names
from nnsam2_assets.ingest.clicks import Click


def clicks_from_labels(
    labels: sitk.Image, z: int, n_interior: int = 4, n_negative: int = 2, seed: int = 0
) -> list[Click]:
    """Clicks on array slice ``z`` of a label image: per class its deepest point and ``n_interior`` more at
    least 3 mm inside, and ``n_negative`` negatives 5-10 mm outside all muscles and within 12 mm of the
    class; physical LPS positions of ``labels``' own grid."""
    rng = np.random.default_rng(seed)
    arr = sitk.GetArrayViewFromImage(labels)[z]
    sampling = tuple(reversed(labels.GetSpacing()[:2]))
    outside = ndimage.distance_transform_edt(arr == 0, sampling=sampling)
    picks: list[tuple[int, int, int, bool]] = []
    for c in (int(v) for v in np.unique(arr) if v):
        inside = ndimage.distance_transform_edt(arr == c, sampling=sampling)
        picks.append((c, *np.unravel_index(int(np.argmax(inside)), arr.shape), True))
        ys, xs = np.nonzero(inside > 3.0)
        for i in rng.choice(len(ys), min(n_interior, len(ys)), replace=False):
            picks.append((c, int(ys[i]), int(xs[i]), True))
        near = (outside > 5) & (outside < 10)
        near &= ndimage.distance_transform_edt(arr != c, sampling=sampling) < 12
        ys, xs = np.nonzero(near)
        for i in rng.choice(len(ys), min(n_negative, len(ys)), replace=False):
            picks.append((c, int(ys[i]), int(xs[i]), False))
    return [
        Click(c, labels.TransformIndexToPhysicalPoint((int(x), int(y), int(z))), positive)
        for c, y, x, positive in picks
    ]


def write_markups(clicks: list[Click], n_classes: int, path: Path, system: str = "LPS") -> Path:
    """A 3D Slicer markups file: one fiducial list, negative points labelled ``-<class>``."""
    names = class_names(n_classes)
    sign = np.array([-1.0, -1.0, 1.0]) if system == "RAS" else np.ones(3)
    points = [
        {
            "label": ("" if c.positive else "-") + names[c.class_id - 1],
            "position": (np.asarray(c.point_lps) * sign).tolist(),
        }
        for c in clicks
    ]
    doc = {
        "@schema": "https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/Markups/Resources/Schema/markups-schema-v1.0.3.json#",
        "markups": [
            {"type": "Fiducial", "name": "prompts", "coordinateSystem": system, "controlPoints": points}
        ],
    }
    path.write_text(json.dumps(doc, indent=1))
    return path


def write_click_csv(clicks: list[Click], n_classes: int, path: Path) -> Path:
    names = class_names(n_classes)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["class", "x", "y", "z", "positive"])
        for c in clicks:
            writer.writerow(
                [names[c.class_id - 1], *(f"{v:.3f}" for v in c.point_lps), str(c.positive).lower()]
            )
    return path
