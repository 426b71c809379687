"""Agreement statistics: golden values from LPM_Segmentator's internal test CSV (docs/method.md, "Measurements"), ICC checked
against pingouin directly, and the mixed-model variant on a deterministic synthetic long-format set."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pingouin as pg
import pytest

from nnsam2_assets.metrics import agreement_plots, stats
from nnsam2_assets.testing.realdata import SHARED_DATA, shared_file

CSV = SHARED_DATA / "lpm_volumes" / "MRI_volume_internal_test331.csv"

# label: (KS p, t_lo, t_hi, bias, SD ddof0, LoA lo, LoA hi, outliers, MAE, Spearman ρ, TOST method)
GOLDEN = {
    1: (0.2114, 54.9682, -49.3495, 0.6754, 4.36754, -7.8849, 9.2358, 18, 3.22, 0.99840, "parametric"),
    2: (0.0077, 54.3121, -52.9758, 0.0889, 2.41771, -4.6498, 4.8276, 20, 1.72, 0.99720, "bootstrap"),
    3: (0.0180, 61.9076, -58.0522, 0.2287, 2.15489, -3.9949, 4.4522, 17, 1.50, 0.99740, "bootstrap"),
    4: (0.1123, 59.6704, -59.8977, -0.0247, 3.94498, -7.7568, 7.7075, 17, 2.87, 0.99864, "parametric"),
}


@pytest.fixture(scope="module")
def volumes() -> pd.DataFrame:
    df = pd.read_csv(shared_file(CSV))
    # columns: Data_set, CT_id, volume{k}_gd (manual), volume{k}_ai (automatic), k = 1..4
    assert {f"volume{k}_{s}" for k in range(1, 5) for s in ("gd", "ai")} <= set(df.columns)
    return df.set_index("CT_id")


@pytest.mark.parametrize("label", sorted(GOLDEN))
def test_golden_agreement_table(volumes: pd.DataFrame, label: int) -> None:
    ks_p, t_lo, t_hi, bias, sd0, lo, hi, n_out, mae, rho, method = GOLDEN[label]
    ai, manual = volumes[f"volume{label}_ai"], volumes[f"volume{label}_gd"]
    row = stats.agreement_table(ai, manual, "volume_ml", label, margin=0.05, ba_ddof=0, n_boot=2000)
    assert list(row) == stats.AGREEMENT_COLUMNS
    assert row["n"] == 331 and row["ba_ddof"] == 0
    assert row["ks_p"] == pytest.approx(ks_p, abs=1e-4)
    assert row["tost_method"] == method
    assert row["tost_t_lower"] == pytest.approx(t_lo, abs=1e-3)
    assert row["tost_t_upper"] == pytest.approx(t_hi, abs=1e-3)
    assert row["tost_equivalent"] and row["tost_p"] < 1e-3
    assert row["bias"] == pytest.approx(bias, abs=1e-4)
    assert row["sd_diff"] == pytest.approx(sd0, abs=1e-5)
    assert row["loa_lower"] == pytest.approx(lo, abs=1e-3)
    assert row["loa_upper"] == pytest.approx(hi, abs=1e-3)
    assert row["n_outliers"] == n_out
    assert row["mae"] == pytest.approx(mae, abs=5e-3)
    assert row["spearman_rho"] == pytest.approx(rho, abs=1e-4)
    assert row["icc3_1"] > 0.99 and row["icc2_1"] > 0.99
    assert row["icc3_1_ci_low"] < row["icc3_1"] < row["icc3_1_ci_high"]
    if label == 1:
        assert row["ols_slope"] == pytest.approx(1.00437, abs=1e-5)
        assert row["ols_intercept"] == pytest.approx(-0.42155, abs=1e-5)
        assert row["manual_mean"] == pytest.approx(250.81, abs=5e-3)


def test_icc_matches_pingouin_directly(volumes: pd.DataFrame) -> None:
    ai, manual = volumes["volume1_ai"], volumes["volume1_gd"]
    long = pd.concat(
        [
            pd.DataFrame({"scan": volumes.index, "rater": "ai", "v": ai.to_numpy()}),
            pd.DataFrame({"scan": volumes.index, "rater": "manual", "v": manual.to_numpy()}),
        ]
    )
    ref = pg.intraclass_corr(long, targets="scan", raters="rater", ratings="v").set_index("Type")["ICC"]
    out = stats.icc(ai, manual)
    assert out["icc3_1"]["icc"] == pytest.approx(ref["ICC(C,1)"], abs=1e-12)
    assert out["icc2_1"]["icc"] == pytest.approx(ref["ICC(A,1)"], abs=1e-12)
    assert "consistency" in out["icc3_1"]["form"] and "absolute agreement" in out["icc2_1"]["form"]
    assert out["icc3_1"]["icc"] > 0.99


def test_ddof_switch_and_margins(volumes: pd.DataFrame) -> None:
    ai, manual = volumes["volume1_ai"], volumes["volume1_gd"]
    ba0, ba1 = stats.bland_altman(ai, manual, ddof=0), stats.bland_altman(ai, manual, ddof=1)
    assert ba1.sd == pytest.approx(ba0.sd * np.sqrt(331 / 330))
    t5, t10 = stats.tost_paired(ai, manual, margin=0.05), stats.tost_paired(ai, manual, margin=0.10)
    assert t10.delta == pytest.approx(2 * t5.delta) and t10.t_lower > t5.t_lower


def test_bootstrap_tost_is_seeded_and_decides() -> None:
    rng = np.random.default_rng(3)
    manual = rng.uniform(100, 200, 60)
    # skewed (squared exponential) differences fail KS -> bootstrap path; mean 2 vs δ = 7.5
    skew = rng.exponential(1.0, 60) ** 2
    ai = manual + skew
    a = stats.tost_paired(ai, manual, margin=0.05, n_boot=2000, seed=7)
    b = stats.tost_paired(ai, manual, margin=0.05, n_boot=2000, seed=7)
    assert a.method == "bootstrap" and a.p == b.p and np.isfinite(a.t_lower)
    assert a.equivalent
    # the same skewed differences shifted past δ are not equivalent
    far = stats.tost_paired(manual + 8 + skew, manual, margin=0.05, n_boot=2000)
    assert far.method == "bootstrap" and not far.equivalent


def test_pairing_by_index_and_small_n() -> None:
    ai = pd.Series([1.0, 2.0, np.nan, 4.0], index=list("abcd"))
    manual = pd.Series([4.1, 2.2, 1.0, 3.0], index=list("dbca"))
    a, m = stats.paired_values(ai, manual)
    np.testing.assert_array_equal(a, [1.0, 2.0, 4.0])
    np.testing.assert_array_equal(m, [3.0, 2.2, 4.1])
    row = stats.agreement_table(ai[:2], manual, "volume_ml", "right_lpm")
    assert row["n"] == 2 and np.isnan(row["bias"]) and np.isnan(row["icc3_1"])


def test_bland_altman_png() -> None:
    rng = np.random.default_rng(0)
    m = rng.uniform(50, 300, 40)
    png = agreement_plots.bland_altman_png(m + rng.normal(0, 3, 40), m, title="label 1", units="mL")
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert (width, height) == (600, 400)


def test_agreement_rows_with_too_few_pairs_then_enough_share_one_duckdb_table():
    """A dataset whose first agreement rows have < 3 pairs must not fix a numeric type on text columns."""
    import duckdb

    from nnsam2_assets.metrics.stats import agreement_table
    from nnsam2_assets.metrics.store import SCHEMA, replace_dataset_rows

    idx = [f"s{i}" for i in range(6)]
    few = agreement_table(
        pd.Series([1.0, 2.0], index=idx[:2]), pd.Series([1.1, 2.1], index=idx[:2]), "v", "l"
    )
    assert few["tost_method"] == "not computed (n < 3)" and np.isnan(few["tost_p"])
    rng = np.random.default_rng(0)
    manual = pd.Series(rng.normal(100, 10, 6), index=idx)
    enough = agreement_table(manual + rng.normal(0, 1, 6), manual, "v", "l")
    assert enough["tost_method"] in ("parametric", "bootstrap")
    con = duckdb.connect()
    replace_dataset_rows(con, "d", {"agreement": pd.DataFrame([{"dataset": "d", **few}])})
    replace_dataset_rows(con, "d", {"agreement": pd.DataFrame([{"dataset": "d", **enough}])})
    assert con.execute(f"SELECT tost_method FROM {SCHEMA}.agreement").fetchall() == [(enough["tost_method"],)]


def test_constant_measurements_give_nan_correlation_and_r2_without_warnings():
    import warnings

    from nnsam2_assets.metrics.stats import ols_fit, spearman

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rho, p = spearman([1.0, 2.0, 3.0], [5.0, 5.0, 5.0])
        fit = ols_fit([1.0, 2.0, 3.0], [5.0, 5.0, 5.0])
    assert np.isnan(rho) and np.isnan(p) and np.isnan(fit["r2"])
    assert spearman([1.0, 2.0, 3.0], [1.0, 3.0, 2.0])[0] == pytest.approx(0.5)
    # a constant reference used to crash agreement_table (add_constant skipped the intercept column)
    idx = [f"s{i}" for i in range(4)]
    row = stats.agreement_table(
        pd.Series([1.0, 2.0, 3.0, 4.0], index=idx), pd.Series([5.0] * 4, index=idx), "v", "l", n_boot=200
    )
    assert row["bias"] == pytest.approx(-2.5) and np.isnan(row["spearman_rho"])
