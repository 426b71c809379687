"""Propagation asset: masks propagated from the one annotated slice (SAM2 or the registration backend)."""

import dagster as dg

from nnsam2_assets.core.imaging import read_array
from nnsam2_assets.core.overlays import markdown_image, montage_png
from nnsam2_assets.defs.automation import EAGER, GPU_TAGS
from nnsam2_assets.defs.ingest import reference_annotation, scans
from nnsam2_assets.defs.metadata import table
from nnsam2_assets.defs.partitions import datasets_partitions
from nnsam2_assets.defs.resources import NnsamStorage, PropagationSettings
from nnsam2_assets.metrics.qc import confidence_threshold
from nnsam2_assets.propagation import steps as propagation_steps


@dg.asset(
    partitions_def=datasets_partitions,
    group_name="propagation",
    kinds={"nifti", "torch"},
    code_version=propagation_steps.VERSION,
    automation_condition=EAGER,
    deps=[scans, reference_annotation],
    pool="gpu",
    op_tags=GPU_TAGS,
    check_specs=[dg.AssetCheckSpec("propagation_confident", asset="propagated_masks")],
)
def propagated_masks(
    context: dg.AssetExecutionContext, storage: NnsamStorage, propagation: PropagationSettings
) -> dg.MaterializeResult:
    """Masks per scan propagated from the one annotated slice, with a per-slice confidence record
    (predicted IoU, object score, presence, backend and model). Built once per run, reused for every scan.

    The SAM2 backend tracks interleaved reference/target JPEG frames (reference and target slices level by
    level from the annotated slice, both directions, quality 95) and keeps them, with their frame maps, in
    ``frames/<scan>/`` of this asset's folder; the registration backend works on the volumes directly."""
    layout, choice = storage.layout(context.partition_key), propagation.config()
    spec = storage.dataset(context.partition_key)
    report = propagation_steps.propagate_masks(
        spec,
        layout,
        choice.build,
        choice.identity(),
        workers=choice.worker_count(),
    )
    summary = report.summary
    mean_conf = float(summary.mean_confidence.mean()) if len(summary) else 0.0
    metadata = {
        "backend": str(summary.backend.iloc[0]) if len(summary) else "",
        "model_id": str(summary.model_id.iloc[0]) if len(summary) else "",
        "n_scans": len(summary),
        "n_recomputed": report.computed,
        "n_files_rewritten": report.rewritten,
        "workers": report.workers,
        "mean_confidence": mean_conf,
        "n_empty_slices": int(summary.empty_slices.sum()) if len(summary) else 0,
        "scans": table(summary, ["scan", "mean_confidence", "empty_slices", "expert_dice", "backend"]),
        "n_failed": len(report.failed),
        "failed": dg.MetadataValue.json(report.failed),
    }
    for scan, why in report.failed.items():
        context.log.error(f"scan {scan} not propagated (left out of the later steps this run): {why}")
    if len(summary) and summary.expert_dice.notna().any():
        metadata["mean_expert_dice"] = float(summary.expert_dice.mean())
    if len(summary):
        last = summary.scan.iloc[-1]
        image, masks = read_array(layout.scan_image(last)), read_array(layout.masks(last))
        metadata["overlay"] = dg.MetadataValue.md(
            markdown_image(montage_png(image, masks, spec.n_classes), last)
        )
    # the per-scan QC flag's threshold: the backends' confidences live on different scales (0.5 had flagged
    # every good registration-backend dataset, whose confidences are about 0.3)
    threshold = confidence_threshold(metadata["backend"])
    check = dg.AssetCheckResult(
        check_name="propagation_confident",
        passed=bool(mean_conf >= threshold),
        severity=dg.AssetCheckSeverity.WARN,
        metadata={"mean_confidence": mean_conf, "threshold": threshold},
        description=f"mean slice confidence {mean_conf:.2f} below {threshold} ({metadata['backend']} backend): "
        "review the annotation or the backend"
        if mean_conf < threshold
        else "",
    )
    return dg.MaterializeResult(
        metadata=metadata, check_results=[check], data_version=dg.DataVersion(report.data_version)
    )
