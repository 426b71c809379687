"""Metrics assets: per-scan quantification and QC flags, and agreement with experts, written to DuckDB.

Each materialization replaces the dataset's rows of every table it owns in ONE transaction (a kill leaves
the previous rows intact), through the ``metrics_db`` DuckDBResource. Writers share the ``duckdb`` pool
(limit 1), and the resource retries while another process holds the file's lock.
"""

import time

import dagster as dg
import pandas as pd
from dagster_duckdb import DuckDBResource

from nnsam2_assets.core.overlays import markdown_image
from nnsam2_assets.defs.automation import EAGER
from nnsam2_assets.defs.ingest import scans
from nnsam2_assets.defs.metadata import table
from nnsam2_assets.defs.partitions import datasets_partitions
from nnsam2_assets.defs.propagation import propagated_masks
from nnsam2_assets.defs.pseudolabels import pseudo_labels
from nnsam2_assets.defs.refinement import final_masks
from nnsam2_assets.defs.resources import NnsamStorage
from nnsam2_assets.metrics import steps as metrics
from nnsam2_assets.metrics.qc import ERROR, MIN_CONFIDENCE, WARN, QCConfig
from nnsam2_assets.metrics.store import replace_dataset_rows


class QCSettings(dg.Config):
    """Thresholds of the QC flags, defaulting to ``metrics.qc``'s (the confidence one per backend)."""

    min_confidence_sam2: float = MIN_CONFIDENCE["sam2"]
    min_confidence_registration: float = MIN_CONFIDENCE["registration"]
    min_stage_dice: float = QCConfig.min_stage_dice
    max_asymmetry: float = QCConfig.max_asymmetry
    robust_z: float = QCConfig.robust_z
    max_fragment_fraction: float = QCConfig.max_fragment_fraction

    def qc_config(self) -> QCConfig:
        fields = self.model_dump()
        confidence = {
            "sam2": fields.pop("min_confidence_sam2"),
            "registration": fields.pop("min_confidence_registration"),
        }
        return QCConfig(min_confidence=confidence, **fields)


@dg.asset(
    partitions_def=datasets_partitions,
    group_name="metrics",
    kinds={"duckdb"},
    code_version=metrics.VERSION,
    automation_condition=EAGER,
    # scans: images and expert labels; propagated_masks: slice confidence; pseudo_labels: kept slices
    deps=[scans, propagated_masks, pseudo_labels, final_masks],
    pool="duckdb",
    check_specs=[
        dg.AssetCheckSpec("no_broken_outputs", asset="scan_metrics", description="no ERROR-level QC flag"),
        dg.AssetCheckSpec("no_review_flags", asset="scan_metrics", description="no WARN-level QC flag"),
    ],
)
def scan_metrics(
    context: dg.AssetExecutionContext, storage: NnsamStorage, metrics_db: DuckDBResource, config: QCSettings
) -> dg.MaterializeResult:
    """Volume (mL), CT attenuation (HU, unclipped), Dixon fat ratio Σfat/(Σfat+Σwater), Dice vs experts,
    per-slice areas, propagation confidence, stage agreement and QC flags, with lineage, in DuckDB."""
    name = context.partition_key
    result = metrics.dataset_metrics(
        storage.dataset(name), storage.layout(name), config.qc_config(), context.run.run_id
    )
    label_df, flags, k = result.labels, result.flags, result.n_classes
    t0 = time.perf_counter()
    with metrics_db.get_connection() as con:
        written = replace_dataset_rows(con, name, result.tables)
    n_error = int((flags.severity == ERROR).sum()) if len(flags) else 0
    n_warn = int((flags.severity == WARN).sum()) if len(flags) else 0
    shown = label_df[label_df.scheme == f"{k}-class"] if len(label_df) else label_df
    checks = [
        _flag_check("no_broken_outputs", flags, ERROR, dg.AssetCheckSeverity.ERROR),
        _flag_check("no_review_flags", flags, WARN, dg.AssetCheckSeverity.WARN),
    ]
    metadata = {
        "rows_written": dg.MetadataValue.json(written),
        "n_scans": result.n_scans,
        "n_flags_error": n_error,
        "n_flags_warn": n_warn,
        "write_seconds": time.perf_counter() - t0,
        "database": dg.MetadataValue.path(str(metrics_db.database)),
        "metrics": table(
            shown, ["scan", "class_name", "volume_ml", "fat_ratio", "ct_mean_hu", "dice", "qc_flags"]
        ),
        "level_metrics": table(
            result.levels[result.levels.scheme == f"{k}-class"] if len(result.levels) else result.levels,
            [
                "scan",
                "level",
                "class_name",
                "n_slices",
                "volume_ml",
                "mean_csa_mm2",
                "fat_ratio",
                "ct_mean_hu",
            ],
        ),
    }
    if len(shown) and shown.dice.notna().any():
        metadata["mean_dice_vs_expert"] = float(shown.dice.mean())
    if len(shown):
        metadata["mean_volume_ml"] = float(shown.volume_ml.mean())
    return dg.MaterializeResult(
        metadata=metadata, check_results=checks, data_version=dg.DataVersion(result.data_version)
    )


def _flag_check(name: str, flags: pd.DataFrame, level: str, severity) -> dg.AssetCheckResult:
    """Passes when no QC flag of ``level`` was raised; lists the flagged scans otherwise."""
    hits = flags[flags.severity == level] if len(flags) else flags
    metadata = {"flags": table(hits, ["scan", "flag", "detail"])} if len(hits) else {}
    return dg.AssetCheckResult(check_name=name, passed=len(hits) == 0, severity=severity, metadata=metadata)


@dg.asset(
    partitions_def=datasets_partitions,
    group_name="metrics",
    kinds={"duckdb"},
    code_version=metrics.AGREEMENT_VERSION,
    automation_condition=EAGER,
    deps=[scan_metrics],
    pool="duckdb",
)
def agreement(context: dg.AssetExecutionContext, metrics_db: DuckDBResource) -> dg.MaterializeResult:
    """Agreement of the pipeline's measurements with the experts' (scans with expert labels): paired TOST at
    ±5 % and ±10 % of the manual mean, ICC(3,1) consistency and ICC(2,1) absolute agreement, Bland–Altman
    (SD with ddof=1), MAE and Spearman ρ, per measure and label."""
    result = metrics.write_agreement(metrics_db.get_connection, context.partition_key, context.run.run_id)
    rows, summary = result.rows, result.table
    metadata = {
        "rows_written": result.written,
        "n_scans_with_experts": int(rows.dice.notna().groupby(rows.scan).any().sum()) if len(rows) else 0,
        "summary": table(
            summary[summary.tost_margin == 0.05] if len(summary) else summary,
            [
                "scheme",
                "label",
                "measure",
                "n",
                "bias",
                "loa_lower",
                "loa_upper",
                "icc3_1",
                "icc2_1",
                "tost_p",
            ],
        ),
    }
    if result.plot:
        metadata["bland_altman"] = dg.MetadataValue.md(markdown_image(result.plot, "Bland-Altman"))
    return dg.MaterializeResult(metadata=metadata)
