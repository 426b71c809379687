"""Metrics assets: per-scan quantification and QC flags, and agreement with experts, written to DuckDB.

Each materialization replaces the dataset's rows of every table it owns in ONE transaction (a kill leaves
the previous rows intact), through the ``metrics_db`` DuckDBResource. Writers share the ``duckdb`` pool
(limit 1), and the resource retries while another process holds the file's lock.
"""

import time

import dagster as dg
import numpy as np
import pandas as pd
import SimpleITK as sitk
from dagster_duckdb import DuckDBResource

from nnsam2_assets.defs.common import EAGER, md_table
from nnsam2_assets.defs.partitions import datasets_partitions
from nnsam2_assets.defs.refinement import final_masks
from nnsam2_assets.defs.resources import NnsamStorage
from nnsam2_assets.lib import quant, stats
from nnsam2_assets.lib.dataset import class_names
from nnsam2_assets.lib.dataset_steps import ok_scans
from nnsam2_assets.lib.layout import DatasetLayout, stage_prediction
from nnsam2_assets.lib.metrics_db import SCHEMA, replace_dataset_rows
from nnsam2_assets.lib.overlays import markdown_image
from nnsam2_assets.lib.postprocess import fragment_fraction, to_class_space
from nnsam2_assets.lib.qc import ERROR, WARN, QCConfig, qc_flags
from nnsam2_assets.lib.refinement import current_model

METRICS_VERSION = "metrics-v1"
AGREEMENT_VERSION = "agreement-v1"


def _side(name: str) -> str:
    return "right" if name.startswith("right") else "left"


def _read(path) -> sitk.Image:
    return sitk.ReadImage(str(path))


class QCSettings(dg.Config):
    """Thresholds of the QC flags (see lib/qc.py)."""

    min_confidence: float = 0.5
    min_stage_dice: float = 0.85
    max_asymmetry: float = 1.5
    robust_z: float = 3.5
    max_fragment_fraction: float = 0.10


def _scan_rows(spec, layout: DatasetLayout, scan: str, k: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per-label and per-slice metrics of one scan (pooled class space, plus the 2-class merge for 4-class)."""
    mask = _read(layout.final_mask_canonical(scan))
    image = _read(layout.scan_image(scan))
    inputs: dict = {}
    if spec.modality == "ct":
        inputs["ct"] = image
    elif spec.is_dixon and layout.scan_fat(scan).exists():
        inputs["water"], inputs["fat"] = image, _read(layout.scan_fat(scan))
    expert = None
    if layout.scan_expert(scan).exists():
        expert = to_class_space(sitk.GetArrayFromImage(_read(layout.scan_expert(scan))), spec.n_classes, k)
    schemes = [(f"{k}-class", sitk.GetArrayFromImage(mask), expert, k)]
    if k == 4:
        merged_expert = None if expert is None else to_class_space(expert, 4, 2)
        schemes.append(("2-class", to_class_space(sitk.GetArrayFromImage(mask), 4, 2), merged_expert, 2))
    per_label, per_slice = [], []
    for scheme, arr, truth, n in schemes:
        names = {i + 1: c for i, c in enumerate(class_names(n))}
        spacing = mask.GetSpacing()
        rows = quant.quantify(arr, names, scan, expert=truth, spacing=spacing, **inputs)
        if truth is not None:
            ref = quant.quantify(truth, names, scan, spacing=spacing, **inputs)
            rows["expert_volume_ml"] = ref.volume_ml.to_numpy()
            rows["expert_fat_ratio"] = ref.fat_ratio.to_numpy()
            rows["expert_ct_mean_hu"] = ref.ct_mean_hu.to_numpy()
        per_label.append(rows.assign(scheme=scheme))
        if scheme == f"{k}-class":
            sl = quant.quantify_per_slice(arr, names, scan, expert=truth, spacing=spacing, **inputs)
            per_slice.append(sl.assign(scheme=scheme))
    labels = pd.concat(per_label, ignore_index=True)
    labels["side"] = labels.class_name.map(_side)
    return labels, pd.concat(per_slice, ignore_index=True)


@dg.asset(
    partitions_def=datasets_partitions,
    group_name="metrics",
    kinds={"duckdb"},
    code_version=METRICS_VERSION,
    automation_condition=EAGER,
    deps=[final_masks],
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
    layout = DatasetLayout(storage.root, name)
    spec = storage.dataset(name)
    stage3 = current_model(storage.root, "stage3")
    k = int(stage3["n_classes"])
    stage_table_path = layout.dir("final_masks") / "stage_agreement.parquet"
    stage_table = pd.read_parquet(stage_table_path) if stage_table_path.exists() else pd.DataFrame()
    selection = (
        pd.read_parquet(layout.pseudo_selection) if layout.pseudo_selection.exists() else pd.DataFrame()
    )
    lineage = {
        "dataset": name,
        "model_stage": "stage3",
        "model_version": stage3["version"],
        "code_version": METRICS_VERSION,
        "run_id": context.run.run_id,
        "computed_at": pd.Timestamp.now(tz="UTC"),
    }
    labels, slices, confidence, scan_rows = [], [], [], []
    for scan in ok_scans(layout):
        if not layout.final_mask_canonical(scan).exists():
            continue
        per_label, per_slice = _scan_rows(spec, layout, scan, k)
        conf = pd.read_parquet(layout.confidence(scan))
        backend, model_id = str(conf.backend.iloc[0]), str(conf.model_id.iloc[0])
        labels.append(per_label.assign(backend=backend, propagation_model=model_id))
        slices.append(per_slice)
        if len(selection):
            kept = selection[selection.scan == scan][["slice", "kept"]]
            conf = conf.merge(kept, on="slice", how="left")
        confidence.append(conf.drop(columns=["scan"], errors="ignore").assign(scan=scan))
        raw3 = sitk.GetArrayFromImage(_read(stage_prediction(stage3["model_dir"], name, scan)))
        stage_cols = [
            c for c in ("stage1_vs_propagation", "stage2_vs_stage1", "stage3_vs_stage2") if c in stage_table
        ]
        stage_row = stage_table[stage_table.scan == scan] if len(stage_table) else pd.DataFrame()
        scan_rows.append(
            {
                "dataset": name,
                "scan": scan,
                "mean_confidence": float(conf.groupby("slice").confidence.mean().mean()),
                "stage_dice_min": float(stage_row[stage_cols].min(axis=1).iloc[0])
                if len(stage_row)
                else np.nan,
                "fragment_fraction": fragment_fraction(raw3, k),
            }
        )
    label_df = pd.concat(labels, ignore_index=True).assign(**lineage) if labels else pd.DataFrame()
    slice_df = pd.concat(slices, ignore_index=True).assign(**lineage) if slices else pd.DataFrame()
    conf_df = pd.concat(confidence, ignore_index=True).assign(**lineage) if confidence else pd.DataFrame()
    stage_df = stage_table.assign(**lineage) if len(stage_table) else pd.DataFrame()
    qc_input = label_df[label_df.scheme == f"{k}-class"].rename(columns={"ct_mean_hu": "hu_mean"})
    qc_input = qc_input.assign(label=qc_input.class_name)
    cfg = QCConfig(**config.model_dump())
    flags = qc_flags(pd.DataFrame(scan_rows), qc_input, cfg) if len(qc_input) else pd.DataFrame()
    if len(flags):
        flags = flags.assign(**{k_: v for k_, v in lineage.items() if k_ != "dataset"})
        per_scan_flags = flags.groupby("scan").flag.apply(lambda f: ",".join(sorted(set(f))))
        label_df["qc_flags"] = label_df.scan.map(per_scan_flags).fillna("")
    elif len(label_df):
        label_df["qc_flags"] = ""
    t0 = time.perf_counter()
    with metrics_db.get_connection() as con:
        written = replace_dataset_rows(
            con,
            name,
            {
                "scan_metrics": label_df,
                "slice_metrics": slice_df,
                "slice_confidence": conf_df,
                "stage_agreement": stage_df,
                "qc_flags": flags if len(flags) else pd.DataFrame(columns=["dataset"]),
            },
        )
    n_error = int((flags.severity == ERROR).sum()) if len(flags) else 0
    n_warn = int((flags.severity == WARN).sum()) if len(flags) else 0
    shown = label_df[label_df.scheme == f"{k}-class"] if len(label_df) else label_df
    checks = [
        _flag_check("no_broken_outputs", flags, ERROR, dg.AssetCheckSeverity.ERROR),
        _flag_check("no_review_flags", flags, WARN, dg.AssetCheckSeverity.WARN),
    ]
    metadata = {
        "rows_written": dg.MetadataValue.json(written),
        "n_scans": len(scan_rows),
        "n_flags_error": n_error,
        "n_flags_warn": n_warn,
        "write_seconds": time.perf_counter() - t0,
        "database": dg.MetadataValue.path(str(metrics_db.database)),
        "metrics": dg.MetadataValue.md(
            md_table(
                shown, ["scan", "class_name", "volume_ml", "fat_ratio", "ct_mean_hu", "dice", "qc_flags"]
            )
        ),
    }
    if len(shown) and shown.dice.notna().any():
        metadata["mean_dice_vs_expert"] = float(shown.dice.mean())
    if len(shown):
        metadata["mean_volume_ml"] = float(shown.volume_ml.mean())
    return dg.MaterializeResult(metadata=metadata, check_results=checks)


def _flag_check(name: str, flags: pd.DataFrame, level: str, severity) -> dg.AssetCheckResult:
    """Passes when no QC flag of ``level`` was raised; lists the flagged scans otherwise."""
    hits = flags[flags.severity == level] if len(flags) else flags
    metadata = {"flags": dg.MetadataValue.md(md_table(hits, ["scan", "flag", "detail"]))} if len(hits) else {}
    return dg.AssetCheckResult(check_name=name, passed=len(hits) == 0, severity=severity, metadata=metadata)


MEASURES = {
    "volume_ml": "expert_volume_ml",
    "fat_ratio": "expert_fat_ratio",
    "ct_mean_hu": "expert_ct_mean_hu",
}
UNITS = {"volume_ml": "mL", "fat_ratio": "", "ct_mean_hu": "HU"}


@dg.asset(
    partitions_def=datasets_partitions,
    group_name="metrics",
    kinds={"duckdb"},
    code_version=AGREEMENT_VERSION,
    automation_condition=EAGER,
    deps=[scan_metrics],
    pool="duckdb",
)
def agreement(context: dg.AssetExecutionContext, metrics_db: DuckDBResource) -> dg.MaterializeResult:
    """Agreement of the pipeline's measurements with the experts' (scans with expert labels): paired TOST at
    ±5 % and ±10 % of the manual mean, ICC(3,1) consistency and ICC(2,1) absolute agreement, Bland–Altman
    (SD with ddof=1), MAE and Spearman ρ, per measure and label."""
    name = context.partition_key
    with metrics_db.get_connection() as con:
        rows = con.execute(f"SELECT * FROM {SCHEMA}.scan_metrics WHERE dataset = ?", [name]).df()
    out, plot = [], None
    for (scheme, label), group in rows.groupby(["scheme", "class_name"]) if len(rows) else []:
        group = group.set_index("scan")
        for measure, expert_col in MEASURES.items():
            if expert_col not in group or group[expert_col].isna().all() or group[measure].isna().all():
                continue
            for margin in (0.05, 0.10):
                row = stats.agreement_table(group[measure], group[expert_col], measure, label, margin=margin)
                out.append({"dataset": name, "scheme": scheme, **row})
            if plot is None and measure == "volume_ml" and group[expert_col].notna().sum() >= 3:
                plot = stats.bland_altman_png(
                    group[measure], group[expert_col], f"{name} {label} volume", units=UNITS[measure]
                )
    table = pd.DataFrame(out)
    if len(table):
        table = table.assign(
            code_version=AGREEMENT_VERSION, run_id=context.run.run_id, computed_at=pd.Timestamp.now(tz="UTC")
        )
    with metrics_db.get_connection() as con:
        written = replace_dataset_rows(
            con, name, {"agreement": table if len(table) else pd.DataFrame(columns=["dataset"])}
        )
    metadata = {
        "rows_written": written["agreement"],
        "n_scans_with_experts": int(rows.dice.notna().groupby(rows.scan).any().sum()) if len(rows) else 0,
        "summary": dg.MetadataValue.md(
            md_table(
                table[table.tost_margin == 0.05] if len(table) else table,
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
            )
        ),
    }
    if plot:
        metadata["bland_altman"] = dg.MetadataValue.md(markdown_image(plot, "Bland-Altman"))
    return dg.MaterializeResult(metadata=metadata)
