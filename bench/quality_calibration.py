"""Calibrate the ``low_confidence`` QC flag of the registration backend: which mean propagation confidence
predicts a poor mask, fitted on labelled cases and checked on deliberately broken ones.

    .venv/bin/python -m bench.quality_calibration [--json out.json]

Labelled cases (volume Dice of the propagated mask against the truth is known):
- the MyoSegmenTUM pair in both directions from the top, middle and a lower seed slice (6);
- perturbed copies of the TUM targets: noise, a smooth bias field, an intensity rescale (6);
- phantom cohorts (Dixon water and CT, four seeds) propagated from their reference (>= 24).
Broken cases (the flag must fire): a target without anatomy (smooth noise), a target flipped
anterior-posterior (muscles in front of the spine), and a CT target seeded from an MRI reference.

The fit is a threshold on the mean confidence (as ``scan_metrics`` computes it), the largest one that keeps
every labelled case with Dice >= 0.85 quiet, with a safety margin of half the gap to the next lower case;
it is printed with its leave-one-out error and a linear fit Dice ~ confidence (LOO RMSE). SAM2's predicted
IoU lives on another scale and cannot be calibrated without a checkpoint; its threshold stays 0.5.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from bench._common import cpu_model
from nnsam2_assets.core.labels import mean_dice, merge_sides
from nnsam2_assets.demo.phantom import generate_cohort
from nnsam2_assets.metrics.qc import GOOD_DICE, mean_confidence
from nnsam2_assets.propagation.backends import build_propagator
from nnsam2_assets.testing.realdata import slice_annotation, tum_canonical


def _like(arr: np.ndarray, ref: sitk.Image) -> sitk.Image:
    img = sitk.GetImageFromArray(arr.astype(np.float32))
    img.CopyInformation(ref)
    return img


def _case(
    propagator, name: str, ref: sitk.Image, ref_lab: np.ndarray, z: int, tgt: sitk.Image, truth, modality
):
    res = propagator.propagate(ref, slice_annotation(ref_lab, z, ref), z, tgt, modality)
    k = 4 if ref_lab.max() > 2 else 2
    dice = np.nan if truth is None else mean_dice(merge_sides(res.masks) if k == 4 else res.masks, truth, 2)
    return {
        "case": name,
        "confidence": mean_confidence(res.confidence),
        "dice_2c": dice,
        "broken": truth is None,
    }


def labelled_and_broken_cases(propagator) -> list[dict]:
    rows = []
    tum = {c: tum_canonical(c) for c in ("TUM01", "TUM02")}
    rng = np.random.default_rng(7)
    for ref, tgt in (("TUM01", "TUM02"), ("TUM02", "TUM01")):
        ref_img, ref_lab = tum[ref]
        tgt_img, tgt_lab = tum[tgt]
        truth = merge_sides(tgt_lab)
        n = ref_lab.shape[0]
        for seed_name, z in (("top", n - 1), ("middle", n // 2), ("lower", n // 4)):
            rows.append(
                _case(propagator, f"{ref}->{tgt} {seed_name}", ref_img, ref_lab, z, tgt_img, truth, "mri")
            )
        arr = sitk.GetArrayFromImage(tgt_img)
        scale = float(np.percentile(arr, 99))
        perturbed = {
            "noise": arr + rng.normal(0, 0.05 * scale, arr.shape),
            "bias field": arr * (1 + 0.3 * np.linspace(-1, 1, arr.shape[2])[None, None, :]),
            "rescaled": 0.4 * arr + 0.1 * scale,
        }
        for what, p in perturbed.items():
            rows.append(
                _case(
                    propagator,
                    f"{ref}->{tgt} {what}",
                    ref_img,
                    ref_lab,
                    n // 2,
                    _like(p, tgt_img),
                    truth,
                    "mri",
                )
            )
        noise = ndimage.gaussian_filter(rng.normal(size=arr.shape), (0, 6, 6)) * scale + scale
        rows.append(
            _case(
                propagator, f"{ref}->no anatomy", ref_img, ref_lab, n // 2, _like(noise, tgt_img), None, "mri"
            )
        )
        rows.append(
            _case(
                propagator,
                f"{ref}->{tgt} flipped A/P",
                ref_img,
                ref_lab,
                n // 2,
                _like(arr[:, ::-1], tgt_img),
                None,
                "mri",
            )
        )
    for seed in range(4):
        for kind, modality in (("water", "mri"), ("ct", "ct")):
            cohort = generate_cohort(4, seed=100 + seed, shape_yx=(96, 96), spacing=(2.0, 2.0, 4.0))
            ref = cohort.members[cohort.typical_index]
            z = (ref.region[0] + ref.region[1]) // 2
            for i, member in enumerate(cohort.members):
                if i == cohort.typical_index:
                    continue
                rows.append(
                    _case(
                        propagator,
                        f"phantom {kind} {seed}.{i}",
                        ref.images[kind],
                        ref.labels,
                        z,
                        member.images[kind],
                        merge_sides(member.labels),
                        modality,
                    )
                )
    ct_cohort = generate_cohort(2, seed=300, shape_yx=(96, 96), spacing=(2.0, 2.0, 4.0))
    mri_ref = ct_cohort.members[0]
    z = (mri_ref.region[0] + mri_ref.region[1]) // 2
    rows.append(
        _case(
            propagator,
            "phantom water->ct",
            mri_ref.images["water"],
            mri_ref.labels,
            z,
            ct_cohort.members[1].images["ct"],
            None,
            "mri",
        )
    )
    return rows


def fit_threshold(conf: np.ndarray, good: np.ndarray) -> float:
    """Half-way between the lowest confidence of a good case and the highest one below it (0 if none)."""
    lowest_good = conf[good].min()
    below = conf[conf < lowest_good]
    return float((lowest_good + below.max()) / 2) if len(below) else float(lowest_good * 0.9)


def calibrate(rows: list[dict]) -> dict:
    conf = np.array([r["confidence"] for r in rows])
    dice = np.array([r["dice_2c"] for r in rows], dtype=float)
    broken = np.array([r["broken"] for r in rows])
    good = ~broken & (dice >= GOOD_DICE)
    should_fire = broken | (dice < GOOD_DICE)
    threshold = fit_threshold(conf, good)
    loo_errors = 0  # good cases flagged or broken cases missed, each predicted by a fit without it
    for i in np.flatnonzero(good | broken):
        keep = np.arange(len(rows)) != i
        t = fit_threshold(conf[keep], good[keep])
        loo_errors += int((conf[i] < t) != broken[i])
    labelled = ~broken
    slope, intercept = np.polyfit(conf[labelled], dice[labelled], 1)
    residuals = []
    idx = np.flatnonzero(labelled)
    for i in idx:
        rest = idx[idx != i]
        s, c = np.polyfit(conf[rest], dice[rest], 1)
        residuals.append(dice[i] - (s * conf[i] + c))
    return {
        "threshold": round(threshold, 3),
        "n_labelled": int(labelled.sum()),
        "n_broken": int(broken.sum()),
        "quiet_on_good": bool((conf[good] >= threshold).all()),
        "fires_on_broken": bool((conf[broken] < threshold).all()),
        "loo_misclassified_good_or_broken": f"{loo_errors} of {int((good | broken).sum())}",
        # working masks below the Dice bar that the confidence cannot tell from good ones
        "unflagged_below_good_dice": f"{int((should_fire & ~broken & (conf >= threshold)).sum())} of "
        f"{int((should_fire & ~broken).sum())}",
        "dice_fit": f"dice = {slope:.3f} * confidence + {intercept:.3f}",
        "dice_fit_loo_rmse": round(float(np.sqrt(np.mean(np.square(residuals)))), 4),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    rows = labelled_and_broken_cases(build_propagator("registration"))
    result = calibrate(rows)
    for r in rows:
        print(
            f"{r['case']:<32} confidence {r['confidence']:.3f}  Dice2 {r['dice_2c']:.3f}  {'BROKEN' if r['broken'] else ''}"
        )
    print(json.dumps(result, indent=2))
    print(f"{time.perf_counter() - t0:.0f} s on {cpu_model()}")
    if args.json:
        args.json.write_text(json.dumps({"cases": rows, "fit": result}, indent=2, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
