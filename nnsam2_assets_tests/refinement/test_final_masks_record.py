"""What the final masks asset says of itself: its data version follows everything the metrics read from it,
and a scan without a final mask is named by its check."""

from __future__ import annotations

import pandas as pd

from nnsam2_assets.core.layout import DatasetLayout
from nnsam2_assets.core.storage import atomic_write_dataframe, atomic_write_json
from nnsam2_assets.refinement.final_masks import final_masks_version, scans_without_final_mask


def _written(layout: DatasetLayout, models: dict, stage1_dice: float) -> None:
    table = pd.DataFrame({"scan": ["a", "b"], "mask_sha256": ["m1", "m2"], "stage2_vs_stage1": stage1_dice})
    atomic_write_dataframe(table, layout.stage_agreement)
    atomic_write_json({"models": models, "final_rule": "propagated masks"}, layout.final_summary)


def test_a_retrain_that_keeps_the_masks_is_a_new_version(tmp_path):
    """The held-out check kept the propagated masks, so a retrain left every mask byte for byte: the version
    was the masks' alone, and the metrics went on naming the old models and their stage Dice."""
    layout = DatasetLayout(tmp_path, "ds")
    assert final_masks_version(layout) == "empty"
    _written(layout, {"stage3": "v1"}, 0.9)
    first = final_masks_version(layout)
    _written(layout, {"stage3": "v1"}, 0.9)
    assert final_masks_version(layout) == first  # the same written again: no change downstream
    _written(layout, {"stage3": "v2"}, 0.9)
    retrained = final_masks_version(layout)
    assert retrained != first
    _written(layout, {"stage3": "v2"}, 0.8)
    assert final_masks_version(layout) not in (first, retrained)


def test_a_scan_that_passed_ingest_without_a_final_mask_is_named(tmp_path):
    """A scan whose propagation failed was left out of the final masks' scan list, so the completeness check
    compared the table with itself and passed."""
    layout = DatasetLayout(tmp_path, "ds")
    manifest = pd.DataFrame({"scan": ["a", "b", "c"], "status": ["ok", "ok", "error"], "source_hash": "x"})
    atomic_write_dataframe(manifest, layout.manifest)
    assert scans_without_final_mask(layout, pd.DataFrame({"scan": ["a"]})) == ["b"]
    assert scans_without_final_mask(layout, pd.DataFrame({"scan": ["a", "b"]})) == []
    assert scans_without_final_mask(layout, pd.DataFrame()) == ["a", "b"]
