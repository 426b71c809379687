"""Post hoc ablation of the final-mask rule: how else the three stages' predictions and the propagated masks
could make the final sides, scored on runs that ``bench.refinement_bench --workdir DIR`` kept.

    .venv/bin/python -m bench.refinement_bench --workdir DIR      # the TUM directions and the demo cohort
    .venv/bin/python -m bench.final_mask_variants DIR [--json out.json]

No model is trained or run again: every variant reads the kept runs' stage predictions. Per case (a TUM
direction's target scan; every scan of a demo dataset), 2-class volume Dice, signed side volume errors and
the Dixon fat-ratio errors, averaged over a dataset's scans, and how many scans fall below propagation:

- ``propagation``: the propagated masks;
- ``final``: the run's final masks, as published;
- ``stage3 finished``: the stage-3 prediction cleaned with its side edges re-placed (``finish_refined``);
- ``bare consensus``: that, where the propagated mask has the same side (the rule until ``final-v5``);
- ``consensus``: the bare consensus with its side edges placed on the image again (``refined_final``, the
  default rule);
- ``stage1 consensus``: the default rule from the stage-1 prediction;
- ``stage vote consensus``: SimpleITK's ``LabelVoting`` of stages 1-3 (a tie takes stage 3's label),
  finished, then the default rule;
- ``stages 2+3 consensus``: the union of the finished stage-2 and stage-3 predictions (stage 3's label where
  it has one), then the default rule: where one stage falls short, the other's claim can still meet the
  propagated side;
- ``shape average``: the sides of the finished stage 3 and of the propagation averaged as shapes (each edge
  half-way between the two, from their signed distances), then finished on the image;
- ``disagreement walker``: where the finished stage-3 and the propagated sides disagree, scikit-image's
  random walker on the scan's image decides, seeded by the voxels where they agree;
- ``tissue walker`` (Dixon): the same walker on two channels, the water image and the fat fraction, so that
  a disputed voxel of fatty tissue (the masks' excess at the muscle edge) is told from muscle even where the
  water image alone has no edge;
- ``consensus, tissue finish`` (Dixon): the default rule with its last edge placement (the one after the
  consensus) on those two channels instead of the water image alone: the excess that both masks agree on
  never reaches the disagreement walker, but it does lie in the edge band.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk
from scipy import ndimage

from bench._common import cpu_model
from bench.refinement_bench import CASES, cohort_scores, score
from nnsam2_assets.core.imaging import read_array, read_image
from nnsam2_assets.core.intensities import registration_intensities
from nnsam2_assets.core.labels import to_class_space
from nnsam2_assets.core.layout import DatasetLayout, stage_prediction
from nnsam2_assets.core.masks import clean_labels
from nnsam2_assets.core.walker import walk
from nnsam2_assets.ingest.convention import load_dataset
from nnsam2_assets.metrics.quant import fat_ratio_of_sums
from nnsam2_assets.propagation.boundary import BETA, band_pixels, refine_side_boundaries
from nnsam2_assets.refinement.final_masks import consensus, refined_final
from nnsam2_assets.refinement.finishing import finish_refined
from nnsam2_assets.refinement.models import STAGES, current_model
from nnsam2_assets.refinement.nnunet.level_set import signed_distance
from nnsam2_assets.testing.realdata import allow_shared_data

WALK_MARGIN_PX = 3  # the walker's box around the disputed voxels


def stage_vote(predictions: list[np.ndarray]) -> np.ndarray:
    """Per voxel the label most stages give; where all differ, the last stage's."""
    images = [sitk.GetImageFromArray(p.astype(np.uint8)) for p in predictions]
    undecided = 255
    voted = sitk.GetArrayFromImage(sitk.LabelVoting(images, undecided))
    return np.where(voted == undecided, predictions[-1], voted).astype(np.uint8)


def disagreement_walker(refined: np.ndarray, propagated: np.ndarray, intensities: np.ndarray) -> np.ndarray:
    """2-class sides: the agreed voxels as they are, the disputed ones as the random walker places them on
    ``intensities`` (z, y, x), or on several channels together (z, y, x, channels)."""
    out = refined.copy()
    for z in range(refined.shape[0]):
        disputed = refined[z] != propagated[z]
        if not disputed.any():
            continue
        seeds = np.where(disputed, 0, refined[z] + 1).astype(np.int32)
        within = ndimage.binary_dilation(disputed, iterations=WALK_MARGIN_PX)
        walked = walk(intensities[z], seeds, BETA, within)
        out[z] = np.where(disputed, np.where(walked > 1, walked - 1, 0), refined[z])
    return clean_labels(out, 2)


def shape_average(
    refined: np.ndarray, propagated: np.ndarray, spacing_zyx: tuple[float, float, float]
) -> np.ndarray:
    """2-class sides: each side where the mean of the two masks' in-plane signed distances is negative, so
    its edge lies half-way between theirs (shape-based averaging, Rohlfing and Maurer 2007). A side one
    mask lacks on a slice is left out there."""
    sides = np.zeros(refined.shape, np.uint8)
    sampling = (spacing_zyx[1], spacing_zyx[2])
    for z in range(refined.shape[0]):
        deepest = np.zeros(refined.shape[1:])  # the winning side's mean distance: negative where one won
        for side in (1, 2):
            mean = (
                signed_distance(refined[z] == side, sampling)
                + signed_distance(propagated[z] == side, sampling)
            ) / 2
            won = mean < deepest
            sides[z][won] = side
            deepest = np.where(won, mean, deepest)
    return sides


def variants(
    propagated: np.ndarray, k_propagated: int, stages: dict[str, np.ndarray], k_model: int,
    image: sitk.Image, modality: str, final: np.ndarray, k_final: int,
    water: np.ndarray | None = None, fat: np.ndarray | None = None,
) -> dict[str, np.ndarray]:  # fmt: skip
    """Every variant's 2-class sides for one scan; a Dixon scan's ``water`` and ``fat`` add the tissue walker."""

    def sides(labels: np.ndarray, k: int) -> np.ndarray:
        return to_class_space(labels, k, 2)

    def finished(labels: np.ndarray) -> np.ndarray:
        return finish_refined(labels, image, modality, k_model)

    def finished_sides(two_class: np.ndarray) -> np.ndarray:
        return finish_refined(two_class, image, modality, 2)

    def agreed(labels: np.ndarray) -> np.ndarray:
        return sides(refined_final(labels, k_model, propagated, k_propagated, image, modality), k_model)

    stage3 = finished(stages["stage3"])
    stage3_sides, propagated_sides = sides(stage3, k_model), sides(propagated, k_propagated)
    spacing_zyx = tuple(reversed(image.GetSpacing()))
    intensities = registration_intensities(sitk.GetArrayViewFromImage(image), modality)
    masks = {
        "propagation": propagated_sides,
        "final": sides(final, k_final),
        "stage3 finished": stage3_sides,
        "bare consensus": sides(consensus(stage3, k_model, propagated, k_propagated), k_model),
        "consensus": agreed(stage3),
        "shape average": finished_sides(shape_average(stage3_sides, propagated_sides, spacing_zyx)),
        "stage1 consensus": agreed(finished(stages["stage1"])),
        "stage vote consensus": agreed(finished(stage_vote([stages[s] for s in STAGES]))),
        "stages 2+3 consensus": agreed(np.where(stage3 > 0, stage3, finished(stages["stage2"]))),
        "disagreement walker": disagreement_walker(stage3_sides, propagated_sides, intensities),
    }
    if water is not None and fat is not None:
        fat_fraction = np.nan_to_num(fat_ratio_of_sums(fat, water))  # per voxel; 0 where there is no signal
        tissue = np.stack([intensities, fat_fraction.astype(np.float32)], axis=-1)
        masks["tissue walker"] = disagreement_walker(stage3_sides, propagated_sides, tissue)
        bare = clean_labels(consensus(stage3, k_model, propagated, k_propagated), k_model)
        band = band_pixels(image.GetSpacing()[0])
        masks["consensus, tissue finish"] = sides(
            clean_labels(refine_side_boundaries(bare, tissue, k_model, band), k_model), k_model
        )
    return masks


def score_run(run: Path, dataset: str, scans: list[str] | None, label: str) -> list[dict]:
    """The variants of one kept run's dataset, averaged over ``scans`` (None: all of them)."""
    storage = run / "storage"
    spec, layout = load_dataset(run / "data", dataset), DatasetLayout(storage, dataset)
    models = {stage: current_model(storage, stage) for stage in STAGES}
    k_model = int(models["stage3"]["n_classes"])
    k_final = int(json.loads(layout.final_summary.read_text())["n_classes"])
    per_variant: dict[str, list[dict]] = {}
    for scan in scans or list(spec.scans):
        truth = read_array(layout.scan_expert(scan))
        image = read_image(layout.scan_image(scan))  # the water image of a Dixon scan
        dixon = layout.scan_fat(scan).exists()
        water = sitk.GetArrayFromImage(image) if dixon else None
        fat = read_array(layout.scan_fat(scan)) if dixon else None
        stages = {
            s: read_array(stage_prediction(Path(m["model_dir"]), dataset, scan)) for s, m in models.items()
        }
        masks = variants(
            read_array(layout.masks(scan)), spec.n_classes, stages, k_model,
            image, spec.modality, read_array(layout.final_mask_canonical(scan)), k_final, water, fat,
        )  # fmt: skip
        for name, sides in masks.items():
            per_variant.setdefault(name, []).append(score(sides, truth, 2, water, fat, spec.n_classes))
    propagation = [r["dice_2c"] for r in per_variant["propagation"]]
    rows = []
    for name, scores in per_variant.items():
        below = sum(r["dice_2c"] < p for r, p in zip(scores, propagation, strict=True))
        rows.append(
            {
                "case": label,
                "variant": name,
                **cohort_scores(scores),
                "scans_below_propagation": f"{below} of {len(scores)}",
            }
        )
    return rows


def score_workdir(workdir: Path) -> list[dict]:
    """Every run ``bench.refinement_bench --workdir`` kept under ``workdir``."""
    allow_shared_data()
    rows = []
    for reference in CASES:
        if (workdir / reference / "storage").exists():
            target = next(c for c in CASES if c != reference)
            rows += score_run(workdir / reference, "tum", [target], f"{reference}->{target}")
    demo = workdir / "demo"
    if (demo / "storage").exists():
        for dataset in sorted(p.name for p in (demo / "data").iterdir() if p.is_dir()):
            rows += score_run(demo, dataset, None, f"demo cohort: {dataset}")
    if not rows:
        raise SystemExit(f"{workdir}: no kept runs (run bench.refinement_bench --workdir {workdir} first)")
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("workdir", help="the folder given to bench.refinement_bench --workdir")
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    rows = score_workdir(Path(args.workdir))
    print(f"CPU: {cpu_model()}")
    table = pd.DataFrame(rows)
    for case, part in table.groupby("case", sort=False):
        print(f"\n{case}: 2-class Dice, side volume error (%) and fat-ratio error against the expert")
        print(part.drop(columns=["case"]).set_index("variant").round(4).to_string())
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
