"""Agreement statistics between AI-derived and manual (expert) measurements, Dagster-free
(docs/method.md, "Measurements").

Paired, one row per scan, reproducing LPM_Segmentator's TOST/Bland–Altman notebooks on top of
scipy/statsmodels/pingouin: KS-gated paired TOST (parametric ``statsmodels.ttost_paired`` or a SEEDED
bootstrap; the reference's was unseeded), ICC via ``pingouin.intraclass_corr``, classic Bland–Altman, MAE,
Spearman ρ, OLS slope/intercept, combined by :func:`agreement_table`. (Longitudinal designs with repeated
visits would need a mixed model; no dataset of this platform has them yet, so none is shipped.)

Bland–Altman SD convention (documented because the two references differ): ``ddof=0`` (population SD,
``np.std``) reproduces the LPM_Segmentator golden table; ``ddof=1`` (sample SD, pandas) is what the nnsam2
notebook uses and is the statistically usual choice, hence the default. Every result records its ddof.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

# pingouin, statsmodels and scipy.stats are imported where they are used: together they take 1.5 s to import
# (pingouin pulls in pyplot), which every Dagster process that loads the code location (the CLI, the UI's
# code server, each run's step fork server) would otherwise pay, though only the cohort statistics use them.

LOA_Z = 1.96
# Keys of :func:`agreement_table`, in order (a fixed schema for the metrics database).
AGREEMENT_COLUMNS = [
    "measure",
    "label",
    "n",
    "manual_mean",
    "manual_sd",
    "ai_mean",
    "ai_sd",
    "bias",
    "sd_diff",
    "ba_ddof",
    "loa_lower",
    "loa_upper",
    "n_outliers",
    "pct_outliers",
    "mae",
    "spearman_rho",
    "spearman_p",
    "ols_slope",
    "ols_intercept",
    "ols_r2",
    "ks_p",
    "tost_method",
    "tost_margin",
    "tost_delta",
    "tost_t_lower",
    "tost_t_upper",
    "tost_df",
    "tost_p",
    "tost_equivalent",
    "icc3_1",
    "icc3_1_ci_low",
    "icc3_1_ci_high",
    "icc2_1",
    "icc2_1_ci_low",
    "icc2_1_ci_high",
]


def paired_values(
    ai: Sequence[float] | pd.Series, manual: Sequence[float] | pd.Series
) -> tuple[np.ndarray, ...]:
    """Pair two measurement vectors: Series are aligned on their index; rows with a NaN are dropped."""
    if isinstance(ai, pd.Series) and isinstance(manual, pd.Series):
        df = pd.concat({"ai": ai, "manual": manual}, axis=1, join="inner")
    else:
        a, m = np.asarray(ai, dtype=float), np.asarray(manual, dtype=float)
        if a.shape != m.shape:
            raise ValueError(f"ai and manual differ in length ({a.shape} vs {m.shape})")
        df = pd.DataFrame({"ai": a, "manual": m})
    df = df.dropna().astype(float)
    return df["ai"].to_numpy(), df["manual"].to_numpy()


# ---------------------------------------------------------------------------------------------- TOST
@dataclass(frozen=True)
class TostResult:
    """Paired TOST (H0: |mean(ai − manual)| ≥ delta).

    ``method`` is "parametric" (KS p ≥ ks_alpha, statsmodels ttost_paired) or "bootstrap". ``t_lower`` /
    ``t_upper`` / ``p_parametric`` are always the parametric values (reported by the reference for every
    label); ``p`` is the p-value of the method used; ``p_bootstrap`` is NaN unless bootstrap was used.
    """

    method: str
    n: int
    mean_diff: float
    manual_mean: float
    margin: float  # fraction of the manual mean
    delta: float  # absolute equivalence bound = margin · |manual mean|
    ks_p: float
    t_lower: float
    t_upper: float
    df: float
    p_parametric: float
    p_bootstrap: float
    p: float
    equivalent: bool
    alpha: float
    n_boot: int
    seed: int | None

    def as_dict(self) -> dict:
        return asdict(self)


def ks_normality_p(diff: np.ndarray) -> float:
    """One-sample KS p-value of the standardised differences (ddof=1) against N(0,1), as the reference."""
    from scipy import stats as sps

    d = np.asarray(diff, dtype=float)
    z = (d - d.mean()) / d.std(ddof=1)
    return float(sps.ks_1samp(z, sps.norm.cdf).pvalue)


def bootstrap_tost_p(diff: np.ndarray, delta: float, n_boot: int = 10_000, seed: int | None = 0) -> float:
    """Bootstrap TOST p = max(P(boot ≤ −δ), P(boot ≥ δ)) over ``n_boot`` resampled means of the differences.

    Uses ``scipy.stats.bootstrap``'s resampling distribution with a fixed seed so results are reproducible
    (the reference's bootstrap was unseeded).
    """
    from scipy import stats as sps

    res = sps.bootstrap(
        (np.asarray(diff, dtype=float),),
        np.mean,
        n_resamples=n_boot,
        method="percentile",
        rng=np.random.default_rng(seed),
    )
    boot = res.bootstrap_distribution
    return float(max(np.mean(boot <= -delta), np.mean(boot >= delta)))


def tost_paired(
    ai: Sequence[float] | pd.Series,
    manual: Sequence[float] | pd.Series,
    margin: float = 0.05,
    alpha: float = 0.05,
    ks_alpha: float = 0.05,
    n_boot: int = 10_000,
    seed: int | None = 0,
) -> TostResult:
    """KS-gated paired TOST with δ = ``margin`` × |mean(manual)| (0.05 = ±5 %, 0.10 = ±10 %).

    KS on standardised differences (ddof=1); p ≥ ``ks_alpha`` → ``ttost_paired(ai, manual, −δ, δ)``,
    otherwise the seeded bootstrap TOST. Equivalent when p < ``alpha``.
    """
    from statsmodels.stats.weightstats import ttost_paired

    a, m = paired_values(ai, manual)
    if a.size < 3:
        raise ValueError(f"TOST needs at least 3 paired values, got {a.size}")
    diff = a - m
    manual_mean = float(m.mean())
    delta = margin * abs(manual_mean)
    ks_p = ks_normality_p(diff)
    p_par, (t_lo, _, dof), (t_hi, _, _) = ttost_paired(a, m, -delta, delta)
    if ks_p >= ks_alpha:
        method, p_boot, p = "parametric", np.nan, float(p_par)
    else:
        method = "bootstrap"
        p_boot = bootstrap_tost_p(diff, delta, n_boot, seed)
        p = p_boot
    return TostResult(
        method=method,
        n=int(a.size),
        mean_diff=float(diff.mean()),
        manual_mean=manual_mean,
        margin=float(margin),
        delta=float(delta),
        ks_p=ks_p,
        t_lower=float(t_lo),
        t_upper=float(t_hi),
        df=float(dof),
        p_parametric=float(p_par),
        p_bootstrap=float(p_boot),
        p=float(p),
        equivalent=bool(p < alpha),
        alpha=float(alpha),
        n_boot=int(n_boot),
        seed=seed,
    )


# ---------------------------------------------------------------------------------------------- ICC
# pingouin >= 0.6 labels the forms McGraw–Wong style (ICC(C,1), ICC(A,1)); older releases used ICC3/ICC2.
ICC_FORMS = {
    ("ICC(C,1)", "ICC3"): ("icc3_1", "ICC(3,1) consistency: two-way mixed effects, single rater"),
    ("ICC(A,1)", "ICC2"): ("icc2_1", "ICC(2,1) absolute agreement: two-way random effects, single rater"),
}


def icc(ai: Sequence[float] | pd.Series, manual: Sequence[float] | pd.Series) -> dict[str, dict]:
    """ICC(3,1) consistency (the reference's form) and ICC(2,1) absolute agreement via pingouin.

    Returns ``{"icc3_1": {...}, "icc2_1": {...}}``, each with ``form`` (stated in words), ``icc``,
    ``ci_low``, ``ci_high`` (95 %, unrounded), ``F``, ``pval``. Scans are targets, the two methods are raters.
    """
    import pingouin as pg

    a, m = paired_values(ai, manual)
    n = a.size
    long = pd.DataFrame(
        {
            "scan": np.tile(np.arange(n), 2),
            "method": np.repeat(["ai", "manual"], n),
            "value": np.concatenate([a, m]),
        }
    )
    # pingouin rounds CI95 to 2 decimals by default, which gives e.g. ICC 0.999 with CI [1.0, 1.0]; switch the
    # public rounding options off for this call only (restored afterwards).
    saved = dict(pg.options)
    try:
        for key in [k for k in pg.options if k == "round" or k.startswith("round.")]:
            pg.options[key] = None
        table = pg.intraclass_corr(long, targets="scan", raters="method", ratings="value")
    finally:
        pg.options.clear()
        pg.options.update(saved)
    table = table.set_index("Type")
    out = {}
    for types, (key, form) in ICC_FORMS.items():
        row = table.loc[next(t for t in types if t in table.index)]
        lo, hi = row["CI95"]
        out[key] = {
            "form": form,
            "icc": float(row["ICC"]),
            "ci_low": float(lo),
            "ci_high": float(hi),
            "F": float(row["F"]),
            "pval": float(row["pval"]),
        }
    return out


# ---------------------------------------------------------------------------------------------- BA etc.
@dataclass(frozen=True)
class BlandAltman:
    """Classic Bland–Altman of ``diff = ai − manual``; ``sd`` uses ``ddof`` (see module docstring)."""

    n: int
    bias: float
    sd: float
    ddof: int
    loa_lower: float
    loa_upper: float
    n_outliers: int
    pct_outliers: float

    def as_dict(self) -> dict:
        return asdict(self)


def bland_altman(
    ai: Sequence[float] | pd.Series, manual: Sequence[float] | pd.Series, ddof: int = 1, z: float = LOA_Z
) -> BlandAltman:
    """Bias, SD of differences (``ddof`` 0 = LPM_Segmentator golden table, 1 = nnsam2 notebook), limits of
    agreement bias ± z·SD and the number of differences strictly outside them."""
    a, m = paired_values(ai, manual)
    diff = a - m
    bias = float(diff.mean())
    sd = float(diff.std(ddof=ddof))
    lo, hi = bias - z * sd, bias + z * sd
    n_out = int(np.count_nonzero((diff < lo) | (diff > hi)))
    return BlandAltman(int(diff.size), bias, sd, int(ddof), lo, hi, n_out, 100.0 * n_out / diff.size)


def mae(ai: Sequence[float] | pd.Series, manual: Sequence[float] | pd.Series) -> float:
    a, m = paired_values(ai, manual)
    return float(np.mean(np.abs(a - m)))


def spearman(ai: Sequence[float] | pd.Series, manual: Sequence[float] | pd.Series) -> tuple[float, float]:
    """Spearman ρ and its p-value; NaN for both when either side is constant (ρ is undefined there)."""
    from scipy import stats as sps

    a, m = paired_values(ai, manual)
    if a.size < 2 or np.ptp(a) == 0 or np.ptp(m) == 0:
        return float("nan"), float("nan")
    res = sps.spearmanr(a, m)
    return float(res.statistic), float(res.pvalue)


def ols_fit(ai: Sequence[float] | pd.Series, manual: Sequence[float] | pd.Series) -> dict:
    """OLS ``ai = intercept + slope · manual`` (statsmodels); slope, intercept, their SEs and R².
    All NaN when the reference is constant: there is no slope to fit."""
    import statsmodels.api as sm

    a, m = paired_values(ai, manual)
    if a.size < 2 or np.ptp(m) == 0:
        return dict.fromkeys(("slope", "intercept", "slope_se", "intercept_se", "r2"), float("nan"))
    with np.errstate(divide="ignore", invalid="ignore"):  # R² of constant AI values is NaN, not a warning
        res = sm.OLS(a, sm.add_constant(m)).fit()
        r2 = float(res.rsquared)
    return {
        "slope": float(res.params[1]),
        "intercept": float(res.params[0]),
        "slope_se": float(res.bse[1]),
        "intercept_se": float(res.bse[0]),
        "r2": r2,
    }


def agreement_table(
    ai: pd.Series,
    manual: pd.Series,
    measure: str,
    label: str | int,
    margin: float = 0.05,
    ba_ddof: int = 1,
    alpha: float = 0.05,
    n_boot: int = 10_000,
    seed: int | None = 0,
) -> dict:
    """One flat row of agreement statistics for a (measure, label) — fixed keys for a DuckDB table.

    Series are paired on their index (scan ids); NaN pairs are dropped. With fewer than 3 pairs only the
    counts/means are filled and the statistics are NaN.
    Keys, in order: ``AGREEMENT_COLUMNS`` (manual_sd/ai_sd use ddof=1; ``sd_diff`` uses ``ba_ddof``; ICCs
    are ICC(3,1) consistency and ICC(2,1) absolute agreement with 95 % CIs; TOST at ±``margin``).
    """
    a, m = paired_values(ai, manual)
    n = int(a.size)
    row: dict = {
        "measure": measure,
        "label": str(label),
        "n": n,
        "manual_mean": float(m.mean()) if n else np.nan,
        "manual_sd": float(m.std(ddof=1)) if n > 1 else np.nan,
        "ai_mean": float(a.mean()) if n else np.nan,
        "ai_sd": float(a.std(ddof=1)) if n > 1 else np.nan,
    }
    row.update({k: np.nan for k in AGREEMENT_COLUMNS if k not in row})
    # text columns stay text: a first dataset with < 3 pairs must not create a numeric column in DuckDB
    # that a later "parametric"/"bootstrap" cannot be inserted into
    row["tost_method"] = "not computed (n < 3)"
    # the margin the row stands for, computed or not: a dataset's two rows per measure (5 and 10 %) had come
    # out identical with fewer than 3 pairs, and a filter on the margin lost them
    row["tost_margin"] = float(margin)
    if n < 3:
        return row
    ba = bland_altman(a, m, ddof=ba_ddof)
    rho, rho_p = spearman(a, m)
    ols = ols_fit(a, m)
    tost = tost_paired(a, m, margin=margin, alpha=alpha, n_boot=n_boot, seed=seed)
    iccs = icc(a, m)
    row.update(
        bias=ba.bias,
        sd_diff=ba.sd,
        ba_ddof=ba.ddof,
        loa_lower=ba.loa_lower,
        loa_upper=ba.loa_upper,
        n_outliers=ba.n_outliers,
        pct_outliers=ba.pct_outliers,
        mae=mae(a, m),
        spearman_rho=rho,
        spearman_p=rho_p,
        ols_slope=ols["slope"],
        ols_intercept=ols["intercept"],
        ols_r2=ols["r2"],
        ks_p=tost.ks_p,
        tost_method=tost.method,
        tost_margin=tost.margin,
        tost_delta=tost.delta,
        tost_t_lower=tost.t_lower,
        tost_t_upper=tost.t_upper,
        tost_df=tost.df,
        tost_p=tost.p,
        tost_equivalent=tost.equivalent,
    )
    for key, res in iccs.items():
        row[key], row[f"{key}_ci_low"], row[f"{key}_ci_high"] = res["icc"], res["ci_low"], res["ci_high"]
    return row
