"""The ``final_masks`` asset's per-dataset step: stage-3 predictions, cleaned, on each scan's original grid,
with the stage-to-stage agreement per scan. Scans the models have not seen are predicted here. The
refined masks' side edges are re-placed on each scan's own image, as the propagated masks' are.

Per dataset, the held-out check of ``refinement.holdout`` decides whether the refined masks replace the
propagated ones; when it does not, the final masks are the propagated masks and the summary says so. When it
does, a final mask is the consensus of the two (``consensus``): the refined labels where the propagated mask
has the same side.

A 4-class dataset annotated on one slice gets its ES/MF interface moved so that the multifidus' share of
each side rises caudally at least as the anatomy's does (``refinement.muscle_split``); the sides stay.

A user's recorded correction (``refinement.corrections``) replaces its corrected slices of the scan's final
mask; the agreement table says so per scan.

A pool that mixes 4-class and 2-class datasets trains 2-class models. A 4-class dataset in it still gets
4-class final masks: the refined side masks are split into erector spinae and multifidus along the
interface of the scan's propagated 4-class mask (``core.masks.split_sides``), and the summary says so."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk

from nnsam2_assets.core import Log
from nnsam2_assets.core.cache import ScanCache, cache_key
from nnsam2_assets.core.imaging import ScanError, read_array, read_image, to_original_grid
from nnsam2_assets.core.labels import class_names, mean_dice, to_class_space, unannotated_classes
from nnsam2_assets.core.layout import DatasetLayout
from nnsam2_assets.core.masks import clean_labels, fragment_fraction, split_sides
from nnsam2_assets.core.overlays import montage_png
from nnsam2_assets.core.storage import (
    atomic_write_dataframe,
    atomic_write_image,
    atomic_write_json,
    atomic_write_text,
    sha256_file,
)
from nnsam2_assets.ingest.annotation import annotated_slices, read_annotation_clicks, read_annotation_meta
from nnsam2_assets.ingest.convention import DatasetSpec
from nnsam2_assets.ingest.scans import ok_scans
from nnsam2_assets.propagation.base import target_seed_slice
from nnsam2_assets.propagation.boundary import band_key
from nnsam2_assets.propagation.steps import mask_digest
from nnsam2_assets.refinement.corrections import (
    NO_CORRECTION,
    AppliedCorrection,
    apply_correction,
    current_record,
    ingest_keys,
)
from nnsam2_assets.refinement.finishing import finish_refined
from nnsam2_assets.refinement.holdout import (
    MIN_HELDOUT_DICE,
    RefinementDecision,
    decide,
    held_out_slab,
    slab_changed,
)
from nnsam2_assets.refinement.models import STAGES, current_model
from nnsam2_assets.refinement.muscle_split import (
    CAUDAL_SHARE_SLOPE_PER_MM,
    apply_caudal_share,
    caudal_mm_per_slice,
)
from nnsam2_assets.refinement.prediction import StagePredictions, scan_key, scan_roi
from nnsam2_assets.refinement.stages import VERSION


@dataclass
class FinalMasks:
    table: pd.DataFrame
    n_computed: int
    class_names: tuple[str, ...]
    models: dict
    overlay_png: bytes | None
    decision: RefinementDecision
    rule: str  # what the final masks are: ``CONSENSUS_RULE`` or the propagated masks
    split_slices: list[int]  # the annotated slices every level's ES/MF split comes from (4-class; else empty)
    # the least caudal rise given to the multifidus' share; None: not applied
    caudal_slope_per_mm: float | None


def write_on_original_grid(
    spec: DatasetSpec, layout: DatasetLayout, scan: str, canonical: sitk.Image, version: str
) -> list[str]:
    """The final mask on the scan's original grid (NIfTI), and for a scan ingested from a DICOM series also
    as a DICOM Segmentation object referencing that series, or, where none can be made, the reason in its
    place (``layout.final_mask_dicom_seg_refusal``). Returns notes on the series' identifiers."""
    source = spec.scans[scan].image
    original = read_image(source)
    on_original = to_original_grid(canonical, original)
    atomic_write_image(on_original, layout.final_mask(scan))
    seg, refusal = layout.final_mask_dicom_seg(scan), layout.final_mask_dicom_seg_refusal(scan)
    refusal.unlink(missing_ok=True)
    if not source.is_dir():  # a scan once read from a series may now be a NIfTI file: its old SEG must go
        seg.unlink(missing_ok=True)
        return []

    def refused(reason: str) -> list[str]:
        seg.unlink(missing_ok=True)
        atomic_write_text(reason + "\n", refusal)
        return [reason]

    if not sitk.GetArrayViewFromImage(on_original).any():
        return refused("the final mask is empty: no DICOM Segmentation written")
    # highdicom and pydicom (0.4 s to import) only for DICOM-sourced scans, not in every process loading the defs
    from nnsam2_assets.outputs.dicom_seg import write_dicom_seg

    # final masks are in the dataset's own classes (a 2-class pool's sides are split for a 4-class dataset)
    try:
        return write_dicom_seg(on_original, source, class_names(spec.n_classes), seg, version, original)
    except ScanError as exc:  # the NIfTI mask stands; one series a SEG cannot be made of fails no other scan
        return refused(f"no DICOM Segmentation written: {exc}")


# v3: the consensus of the refined and the propagated sides; v4: the caudal multifidus share; v5: the
# consensus' side edges re-placed on the image; v6: the caudal share moves the ES/MF interface parallel to
# itself when the multifidus shrinks, and the reference's drawn slices are its final mask's there
FINAL_MASKS_VERSION = "final-v6"
# the final_masks asset's code version: its own rules and the refinement code that finishes the predictions
CODE_VERSION = f"{FINAL_MASKS_VERSION}+{VERSION}"
# what the final masks are when refined
CONSENSUS_RULE = "consensus of refined and propagated sides, edges re-placed on the image"


def consensus(refined: np.ndarray, k: int, propagated: np.ndarray, k_propagated: int) -> np.ndarray:
    """The refined labels where the propagated mask puts the same side there; background where the two
    disagree.

    Why: registration and the models err in different ways, but both put too much at the muscles' edges (on
    the TUM pair and the demo phantoms, and on every further scan the accuracy issue reports: volumes 4-19 %
    too large), and neither knows which of its edge voxels are wrong. A voxel both call the same side's muscle
    is kept; a voxel only one of them claims is not. Measured by the accuracy bench over the eight side
    volumes of the two TUM directions and both demo datasets: mean |volume error| 7.2 % -> 1.9 %, side Dice
    within -0.007..+0.002 of the refined masks (`docs/accuracy.md`, accuracy bench)."""
    same_side = to_class_space(refined, k, 2) == to_class_space(propagated, k_propagated, 2)
    return np.where(same_side, refined, 0).astype(refined.dtype)


def refined_final(
    finished: np.ndarray,
    k: int,
    propagated: np.ndarray,
    k_propagated: int,
    image: sitk.Image,
    modality: str,
) -> np.ndarray:
    """A scan's refined final mask: the ``consensus`` of a stage prediction already finished on the image
    (``finish_refined``) with the propagated sides, finished on the image again.

    Why the second finish: where the two edges cross, the consensus edge is each voxel's inner one, an
    outline that follows neither the image nor either mask. Placed on the image in the same band as every
    other mask's, it gained 2-class Dice over the bare consensus in all four cases of the accuracy bench
    (+0.0001 to +0.008, the same models) while the TUM side volumes stayed within -4.7..+4.0 %
    (`docs/accuracy.md`, ablation table)."""
    return finish_refined(consensus(finished, k, propagated, k_propagated), image, modality, k)


def caudal_share_pivot(annotated: tuple[int, ...], n_classes: int) -> int | None:
    """The reference slice whose ES/MF split every level inherits, when the caudal share applies: a 4-class
    dataset annotated on one slice. Several annotated levels carry their own splits and are left as they
    are; None then."""
    return annotated[0] if n_classes == 4 and len(annotated) == 1 else None


def compose_final(
    finished: np.ndarray | None,
    k: int,
    propagated: np.ndarray,
    k_out: int,
    image: sitk.Image,
    modality: str,
    caudal_level: int | None,
) -> np.ndarray:
    """A scan's final mask in the dataset's ``k_out`` classes, before any user correction: the refined final of
    the stage-3 prediction already ``finished`` on the image (``finish_refined``; pool classes ``k``) when the
    held-out check chose the refined masks, else (None) the cleaned ``propagated`` mask. A 2-class pool's
    sides are split along the propagated ES/MF interface for a 4-class dataset, and ``caudal_level`` (the
    target's annotated level; None: not applied) gives the multifidus its caudal share."""
    if finished is not None:
        final = refined_final(finished, k, propagated, k_out, image, modality)
        if k_out > k:
            spacing_zyx = tuple(reversed(image.GetSpacing()))
            final = clean_labels(split_sides(final, propagated, spacing_zyx), k_out)
    else:
        final = clean_labels(propagated, k_out)
    if caudal_level is not None:
        final = apply_caudal_share(final, caudal_level, caudal_mm_per_slice(image))
    return final


def _dicom_seg_current(spec: DatasetSpec, layout: DatasetLayout, scan: str) -> bool:
    """A DICOM-sourced scan has its Segmentation, or the reason it has none (else a scan without one would be
    recomputed on every run)."""
    if not spec.scans[scan].image.is_dir():
        return True
    return layout.final_mask_dicom_seg(scan).exists() or layout.final_mask_dicom_seg_refusal(scan).exists()


def _correction_columns(corrected: AppliedCorrection | None, img: sitk.Image) -> dict:
    if corrected is None:
        return dict(NO_CORRECTION)
    voxel_ml = float(np.prod(img.GetSpacing())) / 1000.0
    return {
        "corrected": True,
        "n_corrected_slices": corrected.n_slices,
        "correction_dice": corrected.dice_before,
        "correction_volume_change_ml": corrected.foreground_change * voxel_ml,
    }


def _agreement_row(
    layout: DatasetLayout,
    scan: str,
    stages: tuple[np.ndarray, np.ndarray, np.ndarray],
    k: int,
    propagated: np.ndarray,
    k_out: int,
    final: np.ndarray,
    source: str,
    correction: dict,
) -> dict:
    """A scan's row of the stage-to-stage agreement table: each stage's Dice with what it learnt from (pool
    classes ``k``), which masks the final one came from, the published mask's size and digest, its correction
    columns and, where the dataset has the scan's expert labels, the final and the propagated masks' Dice
    against them (the dataset's ``k_out`` classes)."""
    p1, p2, p3 = stages
    row = {
        "scan": scan,
        "stage1_vs_propagation": mean_dice(p1, to_class_space(propagated, k_out, k), k),
        "stage2_vs_stage1": mean_dice(p2, p1, k),
        "stage3_vs_stage2": mean_dice(p3, p2, k),
        "final_source": source,
        "n_voxels": int((final > 0).sum()),
        "mask_sha256": sha256_file(layout.final_mask_canonical(scan))[:16],
        "expert_dice": np.nan,
        **correction,
    }
    if layout.scan_expert(scan).exists():
        truth = read_array(layout.scan_expert(scan))
        # a class the expert did not draw is unknown, not absent
        skip = unannotated_classes(truth, k_out)[k_out]
        row["expert_dice"] = mean_dice(final, truth, k_out, skip)
        row["propagation_expert_dice"] = mean_dice(propagated, truth, k_out, skip)
    return row


def final_masks_version(layout: DatasetLayout) -> str:
    """The data version of what ``make_final_masks`` wrote: the masks, and the stage table and summary that the
    metrics read too (model versions, stage Dice, fragments, the refined-or-propagated decision). The masks
    alone missed a retrain whose masks came out the same (the propagated ones kept), and the metrics went on
    naming the old models."""
    table = layout.stage_agreement
    if not table.exists() or pd.read_parquet(table, columns=["scan"]).empty:
        return "empty"
    summary = sha256_file(layout.final_summary) if layout.final_summary.exists() else ""
    # the table holds each published mask's digest, so its own digest covers the masks
    return cache_key(sha256_file(table), summary)


def scans_without_final_mask(layout: DatasetLayout, table: pd.DataFrame) -> list[str]:
    """The scans that passed ingest and have no row in the final masks' table: a scan whose propagation failed
    has no mask to compose, and is named rather than left out of every count."""
    return sorted(set(ok_scans(layout)) - set(table.scan if len(table) else ()))


def make_final_masks(
    spec: DatasetSpec,
    layout: DatasetLayout,
    scans: list[str],
    root: Path,
    device: str,
    log: Log = print,
    min_heldout_dice: float = MIN_HELDOUT_DICE,
) -> FinalMasks:
    """Final masks for one dataset from the current stage-3 model, with the stage-to-stage agreement table.

    Scans the models have not seen (new scans) are predicted here; each stage's predictor loads at most once
    per run. Output: the cleaned stage-3 mask on the canonical crop and on the original scan's grid.
    """
    models = {stage: current_model(root, stage) for stage in STAGES}
    k = int(models["stage3"]["n_classes"])  # the pooled models' class space
    k_out = spec.n_classes  # the dataset's own: a 2-class pool's sides are split for a 4-class dataset
    if k_out < k:
        raise ValueError(
            f"dataset {spec.name} has {k_out} classes but the stage-3 model predicts {k}: the models were "
            "trained before this dataset joined the pool; materialize nnunet_stage1..3 (or `nnsam2 run`) so "
            "that they train on the pool's common classes"
        )
    predictions = {s: StagePredictions(Path(models[s]["model_dir"]), device) for s in STAGES}
    cache = ScanCache(layout.dir("final_masks"))
    rows, computed, overlay = [], 0, None
    fragments: dict[str, float] = {}
    margins = {stage: models[stage].get("roi_margin_mm") for stage in STAGES}

    def stage_paths(scan: str, img: sitk.Image) -> list[Path]:
        content_key = scan_key(layout, scan)
        # the stages share one profile, hence one margin: the mask is read and the scan hashed once per scan
        rois = {m: scan_roi(layout, scan, m) for m in set(margins.values())}
        return [
            predictions[s].ensure(spec.name, scan, lambda img=img: img, content_key, rois[margins[s]])[0]
            for s in STAGES
        ]

    reference_img = read_image(layout.scan_image(spec.reference))
    n_reference = reference_img.GetSize()[2]
    annotated = annotated_slices(read_annotation_meta(layout))
    pivot = caudal_share_pivot(annotated, k_out)
    reference_prediction = finish_refined(
        read_array(stage_paths(spec.reference, reference_img)[-1]), reference_img, spec.modality, k
    )
    trained_on_it = slab_changed(models["stage3"], spec.name, held_out_slab(layout))
    decision = decide(reference_prediction, k, layout, spec.n_classes, min_heldout_dice, trained_on_it)
    if decision.reason:
        log(f"final masks of {spec.name}: propagated masks kept: {decision.reason}")
    scan_ingest_keys = ingest_keys(layout)  # a correction applies on the crop its slices are numbered on
    # the slices the user drew are the reference's truth there, as a correction is; a click-made mask is not
    drawn = None if read_annotation_clicks(layout) else read_array(layout.annotation)
    log(f"final masks of {spec.name}: {decision.source} (held-out slice Dice {decision.heldout_dice:.3f})")

    for scan in scans:
        img = reference_img if scan == spec.reference else read_image(layout.scan_image(scan))
        record = current_record(layout, scan, scan_ingest_keys)
        key = cache_key(
            CODE_VERSION,
            scan_key(layout, scan),
            # the source file: the mask is also written on its grid (a scan stored in another axis order, or
            # converted from a DICOM series, has the same crop and a new original grid)
            scan_ingest_keys.get(scan, ""),
            models["stage3"]["version"],
            k_out,
            decision.source,
            mask_digest(layout, scan),  # the final mask when propagated, and its ES/MF interface
            record.key if record else "",
            pivot,
            band_key(img.GetSpacing()),  # the edges are placed on the scan's image
        )
        outputs = [layout.final_mask(scan), layout.final_mask_canonical(scan)]
        p1, p2, p3 = (read_array(path) for path in stage_paths(scan, img))
        propagated_own = read_array(layout.masks(scan))  # in the dataset's classes
        if not (cache.is_fresh(scan, key, outputs) and _dicom_seg_current(spec, layout, scan)):
            level = None if pivot is None else target_seed_slice(pivot, n_reference, img.GetSize()[2])
            finished = None
            if decision.use_refined:  # the reference's prediction was finished for the held-out check already
                is_reference = scan == spec.reference
                finished = reference_prediction if is_reference else finish_refined(p3, img, spec.modality, k)
            final = compose_final(finished, k, propagated_own, k_out, img, spec.modality, level)
            if scan == spec.reference and drawn is not None:
                final[list(annotated)] = drawn[list(annotated)]
            corrected = apply_correction(final, layout, record, k_out)
            if corrected is not None:
                final = corrected.mask
            columns = _correction_columns(corrected, img)
            cache.invalidate(scan)
            canonical = sitk.GetImageFromArray(final)
            canonical.CopyInformation(img)
            atomic_write_image(canonical, layout.final_mask_canonical(scan))
            for note in write_on_original_grid(
                spec, layout, scan, canonical, f"{VERSION}/{models['stage3']['version']}"
            ):
                log(f"{scan}: {note}")
            cache.record(scan, key, info=columns)
            computed += 1
        final = read_array(layout.final_mask_canonical(scan))
        # of the raw prediction (cleaning hides it), and only where that prediction is what was published:
        # the fragmented_mask flag asks the user to review the final mask
        fragments[scan] = fragment_fraction(p3, k) if decision.use_refined else float("nan")
        correction = cache.info(scan) or NO_CORRECTION
        rows.append(
            _agreement_row(
                layout,
                scan,
                (p1, p2, p3),
                k,
                propagated_own,
                spec.n_classes,
                final,
                decision.source,
                correction,
            )
        )
        if overlay is None:
            overlay = montage_png(sitk.GetArrayFromImage(img), final, k_out)
    cache.forget_others(set(scans))
    table = pd.DataFrame(rows)
    atomic_write_dataframe(table.assign(dataset=spec.name), layout.stage_agreement)
    versions = {s: m["version"] for s, m in models.items()}
    rule = CONSENSUS_RULE if decision.use_refined else "propagated masks"
    # the reference levels whose ES/MF split every other level inherits (4-class masks only)
    split_slices = list(annotated) if k_out == 4 else []
    caudal_slope = CAUDAL_SHARE_SLOPE_PER_MM if pivot is not None else None
    summary = {
        "models": versions,
        "n_classes": k_out,
        "model_classes": k,
        "final_rule": rule,
        "es_mf_interface": "propagation" if k_out > k or not decision.use_refined else "model",
        "fragment_fraction": fragments,
        "refinement_decision": decision.as_dict(),
        # with click prompts the held-out slice's truth is the mask made of the clicks, not a drawn one
        "heldout_truth": "click-made mask" if read_annotation_clicks(layout) else "drawn annotation",
        "es_mf_split_slices": split_slices,
        # the least caudal rise of the multifidus' share given to the final masks (None: not applied)
        "es_mf_caudal_slope_per_mm": caudal_slope,
    }
    atomic_write_json(summary, layout.final_summary)
    log(
        f"final masks: {computed} recomputed of {len(scans)}; predictors loaded: {sorted(s for s, p in predictions.items() if p.loaded)}"
    )
    return FinalMasks(
        table=table,
        n_computed=computed,
        class_names=class_names(k_out),
        models=versions,
        overlay_png=overlay,
        decision=decision,
        rule=rule,
        split_slices=split_slices,
        caudal_slope_per_mm=caudal_slope,
    )
