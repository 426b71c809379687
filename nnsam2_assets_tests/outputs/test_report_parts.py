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


def test_a_p_value_never_prints_on_the_other_side_of_the_tost_level():
    """0.0496 and 0.0504 both printed 0.050, one beside "equivalent: yes" and one beside "no"."""
    from nnsam2_assets.outputs.report import ALPHA, cell

    for p in (0.0496, 0.0504, 0.04996, 0.049999, 0.05004, 0.012345, 0.5):
        assert (float(cell(p, "tost_p")) < ALPHA) == (p < ALPHA), p
    assert cell(0.0496, "tost_p") == "0.0496" and cell(0.00004, "tost_p") == "<0.001"


def test_agreement_bias_limits_and_error_are_in_the_units_of_their_measure():
    """A fat-ratio bias of -0.0004 printed as -0.000: the agreement columns took three decimals whatever the
    measure, where the fat ratios themselves take four."""
    from nnsam2_assets.outputs.report import cell

    assert cell(-0.00042, "bias", "fat_ratio") == "-0.0004"
    assert cell(0.01234, "loa_upper", "fat_ratio") == "0.0123"
    assert cell(1.2345, "mae", "volume_ml") == "1.23" and cell(12.34, "loa_lower", "ct_mean_hu") == "12.3"
