"""Registration-propagation benchmark on the two manually labelled MyoSegmenTUM Dixon subjects.

Usage: ``python -m bench.propagation_bench [--quick] [--json out.json] [--backend registration]``

For each direction (TUM01→TUM02, TUM02→TUM01) and seed level (top = most superior slice, middle), ONE slice of
the reference's expert labels is propagated to the other subject (water image, 4-class labels; 2-class
scores use the side merge {1,2}→1, {3,4}→2). Reported: mean slice Dice (per-slice Dice averaged over
classes, class-slices empty in both skipped), mean Dice of the 10 % most confident slices, Spearman
ρ(confidence, slice Dice), seconds per target and peak RSS. ``--quick`` runs only the middle seed
TUM01→TUM02 with the backend's fast setting.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from bench._common import cpu_model
from nnsam2_assets.core.labels import mean_dice, mean_slice_dice, merge_sides, slice_dice
from nnsam2_assets.propagation.backends import build_propagator
from nnsam2_assets.testing.realdata import slice_annotation, tum_canonical


def score(masks: np.ndarray, truth: np.ndarray, confidence: pd.DataFrame, n_classes: int) -> dict:
    """Mean slice Dice, Dice of the 10 % most confident slices and Spearman(confidence, slice Dice)."""
    sd = slice_dice(masks, truth, n_classes)
    conf = confidence.groupby("slice")["confidence"].mean().reindex(range(masks.shape[0])).to_numpy()
    ok = ~np.isnan(sd)
    k = max(1, int(round(0.1 * ok.sum())))
    top = np.argsort(-np.where(ok, conf, -np.inf))[:k]
    rho = stats.spearmanr(conf[ok], sd[ok]).statistic if ok.sum() > 2 else float("nan")
    return {
        "dice": mean_slice_dice(masks, truth, n_classes),
        "top10_dice": float(np.nanmean(sd[top])),
        "spearman": float(rho),
        "volume_dice": mean_dice(masks, truth, n_classes),
    }


def run_case(propagator, ref: str, tgt: str, seed_name: str, cases: dict) -> dict:
    """Propagate one seed slice from ``ref`` to ``tgt`` with 4 and 2 classes; return one result row."""
    ref_img, ref_lab = cases[ref]
    tgt_img, tgt_lab = cases[tgt]
    n = ref_lab.shape[0]
    seed = n - 1 if seed_name == "top" else n // 2
    row: dict = {"direction": f"{ref}->{tgt}", "seed": seed_name, "seed_slice": seed}
    seconds = []
    for n_classes in (4, 2):
        r_lab = ref_lab if n_classes == 4 else merge_sides(ref_lab)
        t_lab = tgt_lab if n_classes == 4 else merge_sides(tgt_lab)
        t0 = time.perf_counter()
        res = propagator.propagate(ref_img, slice_annotation(r_lab, seed, ref_img), seed, tgt_img, "mri")
        seconds.append(time.perf_counter() - t0)
        assert res.masks.shape == t_lab.shape
        for key, val in score(res.masks, t_lab, res.confidence, n_classes).items():
            row[f"{key}_{n_classes}c"] = val
    row["seconds_per_target"] = float(np.mean(seconds))
    row["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    return row


def run_propagation_bench(quick: bool = False, backend: str = "registration", **backend_kwargs) -> list[dict]:
    """All (direction × seed) rows; ``quick``: one direction, middle seed, fast backend setting."""
    if quick and backend == "registration":
        backend_kwargs.setdefault("fast", True)
    propagator = build_propagator(backend, **backend_kwargs)
    cases = {c: tum_canonical(c) for c in ("TUM01", "TUM02")}
    plan = [("TUM01", "TUM02"), ("TUM02", "TUM01")]
    seeds = ["middle"] if quick else ["top", "middle"]
    if quick:
        plan = plan[:1]
    return [run_case(propagator, r, t, s, cases) for r, t in plan for s in seeds]


def format_table(rows: list[dict]) -> str:
    cols = [
        ("direction", "direction", "{}"),
        ("seed", "seed", "{}"),
        ("dice_2c", "Dice2", "{:.3f}"),
        ("top10_dice_2c", "top10%2", "{:.3f}"),
        ("spearman_2c", "rho2", "{:.2f}"),
        ("dice_4c", "Dice4", "{:.3f}"),
        ("top10_dice_4c", "top10%4", "{:.3f}"),
        ("spearman_4c", "rho4", "{:.2f}"),
        ("volume_dice_2c", "volDice2", "{:.3f}"),
        ("seconds_per_target", "s/target", "{:.1f}"),
        ("peak_rss_mb", "RSS MB", "{:.0f}"),
    ]
    lines = [" | ".join(f"{h:>11}" for _, h, _ in cols)]
    for r in rows:
        lines.append(" | ".join(f"{fmt.format(r[k]):>11}" for k, _, fmt in cols))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--backend", default="registration")
    args = ap.parse_args(argv)
    rows = run_propagation_bench(quick=args.quick, backend=args.backend)
    print(format_table(rows))
    print(f"CPU: {cpu_model()}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
