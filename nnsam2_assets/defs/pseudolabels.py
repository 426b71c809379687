"""Pseudo-label asset: the confident, plausible slices of the propagated masks, the rest nnU-Net's ignore."""

import dagster as dg

from nnsam2_assets.defs.automation import EAGER
from nnsam2_assets.defs.ingest import scans
from nnsam2_assets.defs.metadata import table
from nnsam2_assets.defs.partitions import datasets_partitions
from nnsam2_assets.defs.propagation import propagated_masks
from nnsam2_assets.defs.resources import NnsamStorage
from nnsam2_assets.pseudolabels import steps as pseudolabels
from nnsam2_assets.pseudolabels.selection import SelectionConfig


class PseudoLabelConfig(dg.Config):
    """nnsam2 step 5 thresholds: ``pseudolabels.selection.SelectionConfig``'s fields and defaults as run
    configuration (top 10 % per level band, area ratio 1.5 both directions)."""

    top_fraction: float = SelectionConfig.top_fraction
    mode: str = SelectionConfig.mode
    n_bands: int = SelectionConfig.n_bands
    min_per_band: int = SelectionConfig.min_per_band
    min_per_scan: int = SelectionConfig.min_per_scan
    area_ratio: float = SelectionConfig.area_ratio
    smooth_direction: str = SelectionConfig.smooth_direction
    min_confidence: float = SelectionConfig.min_confidence


@dg.asset(
    partitions_def=datasets_partitions,
    group_name="propagation",
    kinds={"nifti"},
    code_version=pseudolabels.VERSION,
    automation_condition=EAGER,
    # scans: the scan list and the expert labels the per-slice diagnostics compare with
    deps=[scans, propagated_masks],
)
def pseudo_labels(
    context: dg.AssetExecutionContext, storage: NnsamStorage, config: PseudoLabelConfig
) -> dg.MaterializeResult:
    """Confident, plausible slices kept as labels; every other voxel is nnU-Net's ignore label (full size)."""
    layout = storage.layout(context.partition_key)
    cfg = SelectionConfig(**config.model_dump())
    report = pseudolabels.select_pseudo_labels(storage.dataset(context.partition_key), layout, cfg)
    slices, per_scan = report.table, report.per_scan
    bands = (
        slices[slices.kept].groupby("band").size().reindex(range(cfg.n_bands), fill_value=0)
        if len(slices)
        else []
    )
    metadata = {
        "n_scans": len(per_scan),
        "n_slices_kept": int(per_scan.n_kept.sum()) if len(per_scan) else 0,
        "n_scans_with_nothing_kept": int((per_scan.n_kept == 0).sum()) if len(per_scan) else 0,
        "kept_per_level_band": dg.MetadataValue.json({int(k): int(v) for k, v in dict(bands).items()}),
        "per_scan": table(per_scan, list(per_scan.columns)),
        "selection_mode": cfg.mode,
    }
    for col in ("kept_slice_dice", "all_slice_dice"):
        if col in per_scan and per_scan[col].notna().any():
            metadata[f"mean_{col}"] = float(per_scan[col].mean())
    return dg.MaterializeResult(metadata=metadata, data_version=dg.DataVersion(report.data_version))
