"""The pseudo-label step's per-scan slice tables: a run that dies after a scan's table was computed and
before the selection file was written leaves no key that a later run could take for the new table."""

from __future__ import annotations

import types

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from nnsam2_assets.core.layout import DatasetLayout
from nnsam2_assets.core.storage import atomic_write_dataframe, atomic_write_image
from nnsam2_assets.pseudolabels import steps
from nnsam2_assets.pseudolabels.selection import SelectionConfig


def _propagated(layout: DatasetLayout, scan: str, confidence: float, marker: int) -> None:
    masks = np.zeros((10, 16, 16), np.uint8)
    masks[:, 4:10, 2:7], masks[:, 4:10, 9:14] = 1, 2
    masks[0, 0, 0] = marker  # another mask, the same slices
    atomic_write_image(sitk.GetImageFromArray(masks), layout.masks(scan))
    rows = [
        {"slice": z, "class_id": c, "confidence": confidence, "present": True}
        for z in range(10)
        for c in (1, 2)
    ]
    atomic_write_dataframe(pd.DataFrame(rows), layout.confidence(scan))


def test_a_run_that_dies_before_the_selection_is_written_leaves_no_stale_slice_table(tmp_path, monkeypatch):
    layout = DatasetLayout(tmp_path, "d")
    spec = types.SimpleNamespace(name="d", n_classes=2)
    manifest = pd.DataFrame({"scan": ["a", "b"], "status": "ok", "source_hash": ["x", "y"]})
    atomic_write_dataframe(manifest, layout.manifest)
    for scan in ("a", "b"):
        _propagated(layout, scan, 0.5, 0)
    cfg = SelectionConfig()
    steps.select_pseudo_labels(spec, layout, cfg)

    _propagated(layout, "a", 0.9, 1)  # propagation gave scan a a new mask and confidence
    real = steps.atomic_write_image

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(steps, "atomic_write_image", disk_full)
    with pytest.raises(OSError, match="No space left"):
        steps.select_pseudo_labels(spec, layout, cfg)
    monkeypatch.setattr(steps, "atomic_write_image", real)
    table = steps.select_pseudo_labels(spec, layout, cfg).table
    assert table[table.scan == "a"].confidence.unique().tolist() == [0.9]  # it had stayed 0.5


def test_the_data_version_follows_the_kept_slices_not_the_run(tmp_path):
    """The asset had no data version of its own: Dagster derived one from its code version and inputs, so a
    rerun with other thresholds, keeping other slices, was no change for the stages downstream."""
    layout = DatasetLayout(tmp_path, "d")
    spec = types.SimpleNamespace(name="d", n_classes=2)
    manifest = pd.DataFrame({"scan": ["a", "b"], "status": "ok", "source_hash": ["x", "y"]})
    atomic_write_dataframe(manifest, layout.manifest)
    for scan, confidence in (("a", 0.5), ("b", 0.7)):
        _propagated(layout, scan, confidence, 0)
    first = steps.select_pseudo_labels(spec, layout, SelectionConfig())
    again = steps.select_pseudo_labels(spec, layout, SelectionConfig())
    assert again.data_version == first.data_version and again.rewritten == 0
    more = steps.select_pseudo_labels(spec, layout, SelectionConfig(top_fraction=0.5))
    assert more.table.kept.sum() > first.table.kept.sum()
    assert more.data_version != first.data_version
