"""Propagation assets: frame stacks, propagated masks (SAM2 or registration), filtered pseudo-labels."""

import dagster as dg
import SimpleITK as sitk

from nnsam2_assets.defs.common import EAGER, GPU_TAGS, dataset_layout, md_table
from nnsam2_assets.defs.ingest import reference_annotation, scans
from nnsam2_assets.defs.partitions import datasets_partitions
from nnsam2_assets.defs.resources import NnsamStorage, PropagationSettings
from nnsam2_assets.lib import dataset_steps as steps
from nnsam2_assets.lib.dataset_steps import FRAMES_VERSION, PROPAGATION_VERSION, PSEUDO_VERSION
from nnsam2_assets.lib.overlays import markdown_image, montage_png
from nnsam2_assets.lib.pseudolabels import SelectionConfig


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
    report = steps.build_frame_stacks(storage.dataset(context.partition_key), layout)
    return dg.MaterializeResult(
        metadata={
            "n_targets": len(report.frames_per_target),
            "n_recomputed": report.computed,
            "frames_per_target": dg.MetadataValue.json(report.frames_per_target),
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
    report = steps.propagate_masks(
        storage.dataset(context.partition_key), layout, propagation.build, propagation.identity()
    )
    summary = report.summary
    mean_conf = float(summary.mean_confidence.mean()) if len(summary) else 0.0
    metadata = {
        "backend": str(summary.backend.iloc[0]) if len(summary) else "",
        "model_id": str(summary.model_id.iloc[0]) if len(summary) else "",
        "n_scans": len(summary),
        "n_recomputed": report.computed,
        "n_files_rewritten": report.rewritten,
        "mean_confidence": mean_conf,
        "n_empty_slices": int(summary.empty_slices.sum()) if len(summary) else 0,
        "scans": dg.MetadataValue.md(
            md_table(summary, ["scan", "mean_confidence", "empty_slices", "expert_dice", "backend"])
        ),
    }
    if len(summary) and summary.expert_dice.notna().any():
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
    return dg.MaterializeResult(
        metadata=metadata, check_results=[check], data_version=dg.DataVersion(report.data_version)
    )


class PseudoLabelConfig(dg.Config):
    """nnsam2 step 5 thresholds (defaults: top 10 % per level band, area ratio 1.5 both directions)."""

    top_fraction: float = 0.10
    mode: str = "banded"
    n_bands: int = 5
    min_per_band: int = 1
    min_per_scan: int = 3
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
    cfg = SelectionConfig(**config.model_dump())
    report = steps.select_pseudo_labels(storage.dataset(context.partition_key), layout, cfg)
    table, per_scan = report.table, report.per_scan
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
