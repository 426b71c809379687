"""Pseudo-label selection: banded (ours) vs global (nnsam2's) top-10 % cut, on the real TUM Dixon pair.

    .venv/bin/python -m bench.selection_bench [--json out.json]

Propagates TUM01's annotated slice (middle and top) to TUM01 and TUM02 with the registration backend, then
selects slices both ways and prints, side by side: how many of the 5 level bands the kept slices cover, the
mean distance of kept slices from the seed level, and the 2-class Dice of the kept slices against the expert
labels (and of all slices, for reference).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk

from bench._common import cpu_model
from nnsam2_assets.core.labels import mean_dice, merge_sides
from nnsam2_assets.propagation.registration import RegistrationPropagator
from nnsam2_assets.pseudolabels.selection import SelectionConfig, select_slices, slice_table
from nnsam2_assets.testing.realdata import tum_canonical


def _load(case: str) -> tuple[sitk.Image, np.ndarray]:
    img, labels = tum_canonical(case)
    return img, merge_sides(labels)


def run_selection_bench() -> list[dict]:
    ref_img, ref_lab = _load("TUM01")
    prop = RegistrationPropagator()
    rows = []
    for seed_name in ("middle", "top"):
        z = ref_lab.shape[0] // 2 if seed_name == "middle" else ref_lab.shape[0] - 1
        ann = np.zeros_like(ref_lab)
        ann[z] = ref_lab[z]
        annotation = sitk.GetImageFromArray(ann)
        annotation.CopyInformation(ref_img)
        tables, masks, truths = [], {}, {}
        for case in ("TUM01", "TUM02"):
            img, truth = _load(case)
            result = prop.propagate(ref_img, annotation, z, img, "mri")
            masks[case], truths[case] = result.masks, truth
            tables.append(slice_table("tum", case, result.masks, result.confidence, 2, SelectionConfig()))
        table = pd.concat(tables, ignore_index=True)
        for mode in ("banded", "global"):
            sel = select_slices(table, SelectionConfig(mode=mode, top_fraction=0.10))
            kept = sel[sel.kept]
            dice_kept = [
                mean_dice(masks[r.scan][r.slice], truths[r.scan][r.slice], 2) for r in kept.itertuples()
            ]
            dice_all = [
                mean_dice(masks[r.scan][r.slice], truths[r.scan][r.slice], 2) for r in sel.itertuples()
            ]
            rows.append(
                {
                    "seed": seed_name,
                    "mode": mode,
                    "kept_slices": len(kept),
                    "bands_covered_of_5": int(kept.band.nunique()),
                    "mean_distance_from_seed": float(kept.distance.mean())
                    if "distance" in kept
                    else float("nan"),
                    "kept_slice_dice_2c": float(np.mean(dice_kept)) if dice_kept else float("nan"),
                    "all_slice_dice_2c": float(np.mean(dice_all)),
                }
            )
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    rows = run_selection_bench()
    print(pd.DataFrame(rows).round(3).to_string(index=False))
    print(f"CPU: {cpu_model()}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
