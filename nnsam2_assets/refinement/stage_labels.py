"""What each stage learns: stage 1 the propagated pseudo-labels, a later stage the previous stage's predictions
finished on the image where they agree with their reference; in every stage the labels known exactly (further
annotated and corrected slices) replace what it would learn there, and each reference's annotated slab is
held out for the final masks' check."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from nnsam2_assets.core import Log
from nnsam2_assets.core.imaging import read_array, read_image
from nnsam2_assets.core.labels import ignore_label, mean_dice
from nnsam2_assets.core.layout import DatasetLayout, stage_prediction
from nnsam2_assets.refinement.corrections import corrected_exact_labels
from nnsam2_assets.refinement.finishing import finish_refined
from nnsam2_assets.refinement.holdout import exact_label_slices, held_out_slab
from nnsam2_assets.refinement.models import PREVIOUS, RefinementError, current_model
from nnsam2_assets.refinement.pool import Pool
from nnsam2_assets.refinement.rules import StageRule, select_stage_cases, slice_agreement, volume_smooth


def exact_labels(layout: DatasetLayout) -> list[tuple[str, list[int], Path]]:
    """(scan, canonical slices, label file) of every label known exactly: the reference's further annotated
    slices (``refinement.holdout``) and the users' corrected slices (``refinement.corrections``)."""
    out = [(scan, z, layout.annotation) for scan, z in exact_label_slices(layout).items()]
    return out + [(scan, z, path) for scan, (z, path) in corrected_exact_labels(layout).items()]


def exact_and_held_out(
    labels: dict[tuple[str, str], np.ndarray], pool: Pool
) -> dict[tuple[str, str], np.ndarray]:
    """The one path for labels known exactly (``exact_labels``): they replace whatever the stage would
    learn on their slices, and a scan the stage did not select trains on them alone. Then each reference's
    held-out slab becomes "ignore"; a label left with nothing but ignore is dropped (nnU-Net cannot sample
    from it)."""
    ignore_value = ignore_label(pool.classes)
    out = dict(labels)
    for dataset, layout in pool.layouts.items():
        if not pool.holds(dataset):
            continue
        for scan, slices, path in exact_labels(layout):
            if scan not in pool.scans[dataset]:
                continue
            truth = pool.to_pool(dataset, read_array(path))
            label = out.get((dataset, scan))
            label = np.full(truth.shape, ignore_value, np.uint8) if label is None else label.copy()
            label[slices] = truth[slices]
            out[(dataset, scan)] = label
    return held_out(out, pool)


def exact_lineage(pool: Pool) -> dict[str, list[int]]:
    """{dataset/scan: canonical slices} of the exact labels a stage of ``pool`` trains on: as
    ``exact_and_held_out`` places them, so neither a scan outside the pool nor a corrected slice inside a
    held-out slab is listed."""
    out: dict[str, list[int]] = {}
    for dataset, layout in pool.layouts.items():
        if not pool.holds(dataset):
            continue
        slab = held_out_slab(layout)
        for scan, slices, _ in exact_labels(layout):
            hidden = range(slab.first, slab.last + 1) if slab is not None and scan == slab.scan else ()
            trained = {z for z in slices if z not in hidden}
            if scan in pool.scans[dataset] and trained:
                key = f"{dataset}/{scan}"
                out[key] = sorted(set(out.get(key, [])) | trained)
    return out


def held_out(labels: dict[tuple[str, str], np.ndarray], pool: Pool) -> dict[tuple[str, str], np.ndarray]:
    """The labels with each reference's annotated slab made "ignore"; a label left with nothing but ignore is
    dropped (nnU-Net cannot sample from it)."""
    ignore_value = ignore_label(pool.classes)
    out = dict(labels)
    for dataset, layout in pool.layouts.items():
        slab = held_out_slab(layout)
        if slab is None or (dataset, slab.scan) not in out:
            continue
        hidden = slab.hide(out[(dataset, slab.scan)], ignore_value)
        if (hidden != ignore_value).any():
            out[(dataset, slab.scan)] = hidden
        else:
            del out[(dataset, slab.scan)]
    return out


def stage_labels(stage: str, pool: Pool, root: Path, rule: StageRule | None) -> tuple[pd.DataFrame, dict]:
    """Selection table and {(dataset, scan): label array in pool space} for the stage's training set, with
    every reference's annotated slab held out."""
    labels: dict[tuple[str, str], np.ndarray] = {}
    if stage == "stage1":
        rows = []
        for dataset, scan, layout in pool.items():
            if not layout.pseudo_label(scan).exists():
                continue
            arr = read_array(layout.pseudo_label(scan))
            ignore_value = ignore_label(pool.n_classes[dataset])
            n_kept = int((arr != ignore_value).reshape(arr.shape[0], -1).all(axis=1).sum())
            rows.append({"dataset": dataset, "scan": scan, "n_kept": n_kept, "selected": n_kept > 0})
            if n_kept > 0:
                labels[(dataset, scan)] = pool.to_pool(dataset, arr, ignore=True)
        return pd.DataFrame(rows), exact_and_held_out(labels, pool)

    previous, compare_to = PREVIOUS[stage]
    prev = current_model(root, previous)
    other = current_model(root, compare_to) if compare_to else None
    rows, preds = [], {}
    for dataset, scan, layout in pool.items():
        pred_path = stage_prediction(Path(prev["model_dir"]), dataset, scan)
        if not pred_path.exists() or not pool.holds(dataset):
            continue
        if other is None and not layout.masks(scan).exists():
            # a dataset whose scans were ingested but that failed before propagation (e.g. an unreadable
            # annotation): stage 1 predicted its scans, but there is nothing to compare them with
            continue
        pred = read_array(pred_path)
        if other is None:  # stage 2 compares stage-1 predictions with the propagated masks
            ref = read_array(layout.masks(scan))
            ref = pool.to_pool(dataset, ref)
        else:
            ref_path = stage_prediction(Path(other["model_dir"]), dataset, scan)
            if not ref_path.exists():
                continue
            ref = read_array(ref_path)
        score = mean_dice(pred, ref, pool.classes)
        agree, slices_relaxed = slice_agreement(pred, ref, pool.classes, rule.min_slice_dice)
        rows.append(
            {
                "dataset": dataset,
                "scan": scan,
                "mean_dice": score,
                "smooth_ok": volume_smooth(pred, pool.classes, rule.area_ratio),
                "n_kept": int(agree.sum()),
                "slices_relaxed": slices_relaxed,
            }
        )
        preds[(dataset, scan)] = (pred, agree)
    if not rows:
        raise RefinementError(
            f"{stage}: no {previous} predictions to learn from; rematerialize nnunet_{previous}"
        )
    selection = select_stage_cases(pd.DataFrame(rows), rule)
    selection["relaxed"] = selection.relaxed | (selection.selected & selection.slices_relaxed)
    for row in selection[selection.selected & (selection.n_kept > 0)].itertuples():
        pred, agree = preds[(row.dataset, row.scan)]
        labels[(row.dataset, row.scan)] = finished_label(pool, row.dataset, row.scan, pred, agree)
    if not held_out(labels, pool):
        # nothing learned from the predictions outside the held-out slabs: no labels, so the caller falls
        # back to the pseudo-labels, whatever exact labels (further annotated or corrected slices) exist
        return selection, {}
    return selection, exact_and_held_out(labels, pool)


def finished_label(
    pool: Pool, dataset: str, scan: str, prediction: np.ndarray, agree: np.ndarray
) -> np.ndarray:
    """A later stage's training label from the previous stage's prediction: finished on the scan's image as
    a final mask is (``refinement.finishing``), so the raw prediction's excess is not learned as label; and
    nnU-Net's ignore on the slices where the two compared masks disagree, whose errors (e.g. false positives
    on a neighbouring muscle) would otherwise be learned and reinforced stage after stage."""
    image = read_image(pool.layouts[dataset].scan_image(scan))
    label = finish_refined(prediction, image, pool.modality[dataset], pool.classes)
    label[~agree] = ignore_label(pool.classes)
    return label


def next_stage_labels(
    stage: str, pool: Pool, root: Path, rule: StageRule, log: Log = print
) -> tuple[pd.DataFrame, dict, str]:
    """A later stage's selection table, training labels and where the labels come from.

    Where the previous models agree with their reference on no slice outside the held-out slabs (a training
    budget too small to learn the muscles, or scans that defeat the models), the stage learns from the
    propagated pseudo-labels, as stage 1 does, rather than failing the run: the final masks' held-out check
    still decides whether a refined mask is used. Every dataset is then marked relaxed, so the stage's check
    warns."""
    previous, compare_to = PREVIOUS[stage]
    reference = f"{compare_to} predictions" if compare_to else "propagated masks"
    selection, labels = stage_labels(stage, pool, root, rule)
    if labels:
        agree = f"slice Dice >= {rule.min_slice_dice}"
        return (
            selection,
            labels,
            f"{previous} predictions, finished on the image, on slices agreeing with the {reference} ({agree})",
        )
    source = f"the stage-1 pseudo-labels: no {previous} prediction agreed with the {reference}"
    log(f"{stage}: training on {source}")
    pseudo, labels = stage_labels("stage1", pool, root, None)
    if pseudo.empty:
        return selection, labels, source
    agreement = selection.set_index(["dataset", "scan"])[["mean_dice", "smooth_ok"]]
    return pseudo.join(agreement, on=["dataset", "scan"]).assign(relaxed=True), labels, source
