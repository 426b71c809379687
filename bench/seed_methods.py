"""The two other seed methods on the accuracy benchmark: the TUM pair in both directions, one annotated middle
slice, the whole pipeline at the default profile, one row per variant and stage.

    .venv/bin/python -m bench.seed_methods [--direction both|TUM01|TUM02] [--variants plain,shape,nnsam,supervoxels]
        [--json out.json]

Variants:
- ``plain``: the default trainer and sampling (the refinement benchmark's rows);
- ``shape``: ``trainer: nnsam`` without a SAM2 checkpoint, so the level-set shape head alone (weight-free);
- ``nnsam``: ``trainer: nnsam`` with a RANDOM-weight SAM2 encoder: plumbing and seconds per iteration, not
  accuracy (no checkpoint can be had here);
- ``supervoxels``: the default trainer, its foreground patches centred on supervoxels (``supervoxels`` asset,
  weight-free SLIC) instead of uniformly inside the pseudo-labels.

Prints volume Dice (2- and 4-class), signed volume error per class, fat-ratio error and seconds per training
iteration for each stage and the final masks, with the CPU model. Reads ../shared/data, never copies it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

from bench._common import cpu_model
from bench.refinement_bench import CASES, run_refinement_bench
from nnsam2_assets.defs.resources import RefinementSettings

VARIANTS: dict[str, tuple[str, RefinementSettings]] = {
    "plain": ("plain nnU-Net", RefinementSettings()),
    "shape": ("nnSAM shape head only (no SAM weights)", RefinementSettings(trainer="nnsam")),
    "nnsam": (
        "nnSAM, RANDOM SAM2 weights (plumbing, not accuracy)",
        RefinementSettings(trainer="nnsam", sam2_random_weights=True),
    ),
    "supervoxels": (
        "plain, supervoxel foreground sampling",
        RefinementSettings(foreground_sampling="supervoxels"),
    ),
}
COLUMNS = ["dice_2c", "dice_4c", "vol_err_%_right_lpm", "vol_err_%_left_lpm", "fat_err_right_lpm",
           "fat_err_left_lpm", "s_per_iteration"]  # fmt: skip


def run_variant(variant: str, reference: str) -> list[dict]:
    label, settings = VARIANTS[variant]
    rows = run_refinement_bench("middle", reference=reference, refinement=settings)
    return [{**r, "variant": label} for r in rows]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--direction", choices=["both", *CASES], default="both", help="the annotated scan")
    parser.add_argument(
        "--variants", default=",".join(VARIANTS), help="comma-separated, of " + ", ".join(VARIANTS)
    )
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {sorted(VARIANTS)}")
    references = CASES if args.direction == "both" else (args.direction,)
    rows = []
    for reference in references:
        for variant in variants:
            rows += run_variant(variant, reference)
            if args.json:  # partial results survive a long run cut short
                Path(args.json).write_text(json.dumps(rows, indent=2, default=float))
    print(f"\nCPU: {cpu_model()}")
    table = pd.DataFrame([r for r in rows if r["masks"] != "timings_s"])
    for direction, part in table.groupby("direction", sort=False):
        print(
            f"\n{direction}: volume Dice, signed volume error (%), fat-ratio error, s per training iteration"
        )
        shown = part.set_index(["variant", "masks"])[[c for c in COLUMNS if c in part]]
        print(shown.round(3).to_string())
    for r in rows:
        if r["masks"] == "timings_s":
            print(f"\nwall time (s) {r['direction']} [{r['variant']}]: total {r['total']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
