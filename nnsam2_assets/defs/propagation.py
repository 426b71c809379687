"""Propagation assets: frame stacks, propagated masks (SAM2 or registration), filtered pseudo-labels."""

import json

import dagster as dg
import numpy as np
import pandas as pd
import SimpleITK as sitk

from nnsam2_assets.defs.common import EAGER, GPU_TAGS, dataset_layout, md_table, ok_scans, read_manifest
from nnsam2_assets.defs.ingest import reference_annotation, scans
from nnsam2_assets.defs.partitions import datasets_partitions
from nnsam2_assets.defs.resources import NnsamStorage, PropagationSettings
from nnsam2_assets.lib import frames as frames_lib
from nnsam2_assets.lib.cache import ScanCache, cache_key
from nnsam2_assets.lib.layout import DatasetLayout
from nnsam2_assets.lib.overlays import markdown_image, montage_png
from nnsam2_assets.lib.pseudolabels import (
    SelectionConfig,
    dice_per_class,
    pseudo_label_volume,
    select_slices,
    slice_table,
)
from nnsam2_assets.lib.storage import atomic_write_dataframe, atomic_write_image, sha256_file

FRAMES_VERSION = "frames-v1"
PROPAGATION_VERSION = "propagation-v1"
PSEUDO_VERSION = "pseudo-v1"


def _annotation(layout: DatasetLayout) -> dict:
    return json.loads(layout.annotation_meta.read_text())


def _read(path) -> sitk.Image:
    return sitk.ReadImage(str(path))


@dg.asset(
    partitions_def=datasets_partitions,
    group_name="propagation",
    kinds={"jpeg"},
    code_version=FRAMES_VERSION,
    automation_condition=EAGER,
    deps=[scans, reference_annotation],
)
def frame_stacks(context: dg.AssetExecutionContext, storage: NnsamStorage) -> dg.MaterializeResult:
    """Per target scan, the frame sequence SAM2 sees: reference and target slices interleaved level by level
    from the annotated slice, both directions, JPEG quality 95, with a frame map (scan, slice, role, direction).
    """
    layout = dataset_layout(storage, context.partition_key)
    spec = storage.dataset(context.partition_key)
    ann = _annotation(layout)
    cache = ScanCache(layout.dir("frame_stacks"))
    manifest = read_manifest(layout)
    reference = None
    n_frames, computed = {}, 0
    for scan_id in ok_scans(layout):
        folder = layout.frames(scan_id)
        key = cache_key(FRAMES_VERSION, manifest.loc[scan_id, "source_hash"], ann["annotation_sha256"])
        if not cache.is_fresh(scan_id, key, [folder / "frame_map.parquet"]):
            if reference is None:
                reference = frames_lib.normalise_for_frames(
                    sitk.GetArrayFromImage(_read(layout.scan_image(spec.reference))), spec.modality
                )
            target = frames_lib.normalise_for_frames(
                sitk.GetArrayFromImage(_read(layout.scan_image(scan_id))), spec.modality
            )
            sequences = frames_lib.build_frame_sequence(
                reference, target, ann["seed_slice"], ref_scan=spec.reference, tgt_scan=scan_id
            )
            maps = [
                frames_lib.write_frame_stack(seq, folder / direction) for direction, seq in sequences.items()
            ]
            atomic_write_dataframe(pd.concat(maps, ignore_index=True), folder / "frame_map.parquet")
            cache.record(scan_id, key)
            computed += 1
        n_frames[scan_id] = len(pd.read_parquet(folder / "frame_map.parquet"))
    cache.forget_others(set(n_frames))
    return dg.MaterializeResult(
        metadata={
            "n_targets": len(n_frames),
            "n_recomputed": computed,
            "frames_per_target": dg.MetadataValue.json(n_frames),
            "path": dg.MetadataValue.path(str(layout.dir("frame_stacks"))),
        }
    )


@dg.asset(
    partitions_def=datasets_partitions,
    group_name="propagation",
    kinds={"nifti", "torch"},
    code_version=PROPAGATION_VERSION,
    automation_condition=EAGER,
    deps=[frame_stacks],
    pool="gpu",
    op_tags=GPU_TAGS,
    check_specs=[dg.AssetCheckSpec("propagation_confident", asset="propagated_masks")],
)
def propagated_masks(
    context: dg.AssetExecutionContext, storage: NnsamStorage, propagation: PropagationSettings
) -> dg.MaterializeResult:
    """Masks per scan propagated from the one annotated slice, with a per-slice confidence record
    (predicted IoU, object score, presence, backend and model). Built once per run, reused for every scan."""
    layout = dataset_layout(storage, context.partition_key)
    spec = storage.dataset(context.partition_key)
    ann = _annotation(layout)
    manifest = read_manifest(layout)
    cache = ScanCache(layout.dir("propagated_masks"))
    backend_id = propagation.identity()
    propagator, reference, annotation = None, None, None
    summaries, computed, rewritten = [], 0, 0
    for scan_id in ok_scans(layout):
        key = cache_key(
            PROPAGATION_VERSION, manifest.loc[scan_id, "source_hash"], ann["annotation_sha256"], backend_id
        )
        outputs = [layout.masks(scan_id), layout.confidence(scan_id)]
        if not cache.is_fresh(scan_id, key, outputs):
            if propagator is None:
                propagator = propagation.build()  # once per run, only when some scan needs it
                reference = _read(layout.scan_image(spec.reference))
                annotation = _read(layout.annotation)
            target = _read(layout.scan_image(scan_id))
            result = propagator.propagate(reference, annotation, ann["seed_slice"], target, spec.modality)
            mask = sitk.GetImageFromArray(result.masks.astype(np.uint8))
            mask.CopyInformation(target)
            if _changed(layout.masks(scan_id), result.masks):
                atomic_write_image(mask, layout.masks(scan_id))
                rewritten += 1
            table = result.confidence.assign(scan=scan_id, backend=result.backend, model_id=result.model_id)
            atomic_write_dataframe(table, layout.confidence(scan_id))
            cache.record(scan_id, key)
            computed += 1
        conf = pd.read_parquet(layout.confidence(scan_id))
        summaries.append(_summarise(scan_id, conf, layout, spec.n_classes))
    cache.forget_others({s["scan"] for s in summaries})
    summary = pd.DataFrame(summaries)
    mean_conf = float(summary.mean_confidence.mean()) if len(summary) else 0.0
    metadata = {
        "backend": str(summary.backend.iloc[0]) if len(summary) else "",
        "model_id": str(summary.model_id.iloc[0]) if len(summary) else "",
        "n_scans": len(summary),
        "n_recomputed": computed,
        "n_files_rewritten": rewritten,
        "mean_confidence": mean_conf,
        "n_empty_slices": int(summary.empty_slices.sum()) if len(summary) else 0,
        "scans": dg.MetadataValue.md(
            md_table(summary, ["scan", "mean_confidence", "empty_slices", "expert_dice", "backend"])
        ),
    }
    if summary.expert_dice.notna().any():
        metadata["mean_expert_dice"] = float(summary.expert_dice.mean())
    if len(summary):
        first = summary.scan.iloc[-1]
        img = sitk.GetArrayFromImage(_read(layout.scan_image(first)))
        msk = sitk.GetArrayFromImage(_read(layout.masks(first)))
        metadata["overlay"] = dg.MetadataValue.md(markdown_image(montage_png(img, msk), first))
    check = dg.AssetCheckResult(
        check_name="propagation_confident",
        passed=bool(mean_conf >= 0.5),
        severity=dg.AssetCheckSeverity.WARN,
        metadata={"mean_confidence": mean_conf},
        description="mean slice confidence below 0.5: review the annotation or the backend"
        if mean_conf < 0.5
        else "",
    )
    version = cache_key(*(sha256_file(layout.masks(s)) for s in summary.scan)) if len(summary) else "empty"
    return dg.MaterializeResult(
        metadata=metadata, check_results=[check], data_version=dg.DataVersion(version)
    )


def _changed(path, arr: np.ndarray) -> bool:
    if not path.exists():
        return True
    return not np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(path))), arr)


def _summarise(scan_id: str, conf: pd.DataFrame, layout: DatasetLayout, n_classes: int) -> dict:
    per_slice = conf.groupby("slice").agg(confidence=("confidence", "mean"), present=("present", "all"))
    expert_dice = np.nan
    if layout.scan_expert(scan_id).exists():
        from nnsam2_assets.lib.dataset import merge_sides

        truth = sitk.GetArrayFromImage(_read(layout.scan_expert(scan_id)))
        pred = sitk.GetArrayFromImage(_read(layout.masks(scan_id)))
        if n_classes == 4:
            truth, pred = merge_sides(truth), merge_sides(pred)
        expert_dice = float(np.mean(dice_per_class(pred, truth, 2)))
    return {
        "scan": scan_id,
        "mean_confidence": float(per_slice.confidence.mean()),
        "empty_slices": int((~per_slice.present).sum()),
        "expert_dice": expert_dice,
        "backend": str(conf.backend.iloc[0]),
        "model_id": str(conf.model_id.iloc[0]),
    }


class PseudoLabelConfig(dg.Config):
    """nnsam2 step 5 thresholds (defaults: top 10 % per level band, area ratio 1.5 both directions)."""

    top_fraction: float = 0.10
    mode: str = "banded"
    n_bands: int = 5
    min_per_band: int = 1
    area_ratio: float = 1.5
    smooth_direction: str = "both"
    min_confidence: float = 0.0


@dg.asset(
    partitions_def=datasets_partitions,
    group_name="propagation",
    kinds={"nifti"},
    code_version=PSEUDO_VERSION,
    automation_condition=EAGER,
    deps=[propagated_masks],
)
def pseudo_labels(
    context: dg.AssetExecutionContext, storage: NnsamStorage, config: PseudoLabelConfig
) -> dg.MaterializeResult:
    """Confident, plausible slices kept as labels; every other voxel is nnU-Net's ignore label (full size)."""
    layout = dataset_layout(storage, context.partition_key)
    spec = storage.dataset(context.partition_key)
    cfg = SelectionConfig(**config.model_dump())
    tables = []
    for scan_id in ok_scans(layout):
        masks = sitk.GetArrayFromImage(_read(layout.masks(scan_id)))
        conf = pd.read_parquet(layout.confidence(scan_id))
        tables.append(slice_table(context.partition_key, scan_id, masks, conf, spec.n_classes, cfg))
    table = select_slices(pd.concat(tables, ignore_index=True), cfg) if tables else pd.DataFrame()
    rows = []
    for scan_id, group in table.groupby("scan") if len(table) else []:
        masks_img = _read(layout.masks(scan_id))
        masks = sitk.GetArrayFromImage(masks_img)
        kept = group.slice[group.kept].to_numpy()
        volume = pseudo_label_volume(masks, kept, spec.n_classes)
        out = sitk.GetImageFromArray(volume)
        out.CopyInformation(masks_img)
        if _changed(layout.pseudo_label(scan_id), volume):
            atomic_write_image(out, layout.pseudo_label(scan_id))
        row = {"scan": scan_id, "n_slices": len(group), "n_kept": int(len(kept))}
        row.update(_kept_accuracy(layout, scan_id, masks, kept, spec.n_classes))
        rows.append(row)
    if len(table):
        atomic_write_dataframe(table, layout.pseudo_selection)
    per_scan = pd.DataFrame(rows)
    bands = (
        table[table.kept].groupby("band").size().reindex(range(cfg.n_bands), fill_value=0)
        if len(table)
        else []
    )
    metadata = {
        "n_scans": len(per_scan),
        "n_slices_kept": int(per_scan.n_kept.sum()) if len(per_scan) else 0,
        "n_scans_with_nothing_kept": int((per_scan.n_kept == 0).sum()) if len(per_scan) else 0,
        "kept_per_level_band": dg.MetadataValue.json({int(k): int(v) for k, v in dict(bands).items()}),
        "per_scan": dg.MetadataValue.md(md_table(per_scan, list(per_scan.columns))),
        "selection_mode": cfg.mode,
    }
    for col in ("kept_slice_dice", "all_slice_dice"):
        if col in per_scan and per_scan[col].notna().any():
            metadata[f"mean_{col}"] = float(per_scan[col].mean())
    return dg.MaterializeResult(metadata=metadata)


def _kept_accuracy(layout: DatasetLayout, scan_id: str, masks: np.ndarray, kept, n_classes: int) -> dict:
    """Slice Dice vs expert labels on kept slices against all slices (only where experts exist)."""
    if not layout.scan_expert(scan_id).exists():
        return {}
    truth = sitk.GetArrayFromImage(_read(layout.scan_expert(scan_id)))

    def mean_dice(slices) -> float:
        scores = [np.mean(dice_per_class(masks[z], truth[z], n_classes)) for z in slices]
        return float(np.mean(scores)) if scores else float("nan")

    return {"kept_slice_dice": mean_dice(kept), "all_slice_dice": mean_dice(range(masks.shape[0]))}
