"""Parts of the cohort report on hand-made rows: the QC summary counts scans, and rows written before
corrections were recorded (NULL in their correction columns) render."""

from __future__ import annotations

import pandas as pd

from nnsam2_assets.outputs.report import _correction_note, _qc_summary


def test_the_qc_summary_counts_each_scan_once_per_flag():
    flags = pd.DataFrame(
        {
            "scan": ["s1", "s1", "s2"],  # s1: two empty classes
            "label": ["right_mf", "left_mf", "left_mf"],
            "flag": ["empty_mask"] * 3,
            "severity": ["ERROR"] * 3,
        }
    )
    assert '<td data-col="scans">2</td>' in _qc_summary(flags)


def test_a_row_without_correction_columns_values_has_no_correction_note():
    assert _correction_note(pd.Series({"corrected": pd.NA})) == ""
    assert _correction_note(pd.Series({"corrected": None})) == ""
    note = _correction_note(
        pd.Series(
            {
                "corrected": True,
                "n_corrected_slices": 2,
                "correction_volume_change_ml": -1.5,
                "correction_dice": 0.9,
            }
        )
    )
    assert "2 slice(s)" in note and "-1.5 mL" in note
