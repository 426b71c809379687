"""Per-dataset metrics (nnsam2 steps 7-8) as plain functions: per-scan quantification of the final masks with
QC flags, and agreement with the experts. The Dagster assets (defs/metrics.py) write the returned tables to
DuckDB and render metadata; bench/ calls the same functions without Dagster."""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

import numpy as np
import pandas as pd
import SimpleITK as sitk

from nnsam2_assets.core.cache import ScanCache, cache_key
from nnsam2_assets.core.imaging import read_array, read_image
from nnsam2_assets.core.labels import class_map, side_of, to_class_space, unannotated_classes
from nnsam2_assets.core.layout import SCAN_METRIC_TABLES, DatasetLayout
from nnsam2_assets.core.masks import laterality_gap_voxels
from nnsam2_assets.core.storage import atomic_write_dataframe, sha256_file
from nnsam2_assets.ingest.convention import DatasetSpec
from nnsam2_assets.ingest.scans import ok_scans, read_manifest
from nnsam2_assets.metrics import agreement_plots, quant, stats
from nnsam2_assets.metrics.qc import QC_FLAG_COLUMNS, QCConfig, mean_confidence, qc_flags
from nnsam2_assets.metrics.store import SCHEMA, replace_dataset_rows
from nnsam2_assets.refinement.corrections import NO_CORRECTION

# v4: a dataset without QC flags still writes its (empty) qc_flags table; v5: a class absent from a scan's
# expert labels is not annotated there (its expert columns are NaN, not a volume of 0)
VERSION = "metrics-v5"
AGREEMENT_VERSION = "agreement-v2"
MEASURES = {
    "volume_ml": "expert_volume_ml",
    "fat_ratio": "expert_fat_ratio",
    "ct_mean_hu": "expert_ct_mean_hu",
}
UNITS = {"volume_ml": "mL", "fat_ratio": "", "ct_mean_hu": "HU"}
# what the expert labels give a class's rows: unknown where the expert did not annotate the class
EXPERT_COLUMNS = ("dice", *MEASURES.values())


def _scan_rows(
    spec: DatasetSpec, layout: DatasetLayout, scan: str, k: int, mask: sitk.Image, l4_l5_slice: int | None
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Per-label, per-slice and (when the region names L4/L5) per-level metrics of one scan's final
    ``mask`` (its class space, plus the 2-class merge for 4-class)."""
    image = read_image(layout.scan_image(scan))
    inputs: dict = {}
    if spec.modality == "ct":
        inputs["ct"] = image
    elif spec.is_dixon and layout.scan_fat(scan).exists():
        inputs["water"], inputs["fat"] = image, read_image(layout.scan_fat(scan))
    expert, unannotated = None, {}
    if layout.scan_expert(scan).exists():
        expert = to_class_space(read_array(layout.scan_expert(scan)), spec.n_classes, k)
        unannotated = unannotated_classes(expert, k)
    mask_arr = sitk.GetArrayFromImage(mask)
    schemes = [(f"{k}-class", mask_arr, expert, k)]
    if k == 4:
        merged_expert = None if expert is None else to_class_space(expert, 4, 2)
        schemes.append(("2-class", to_class_space(mask_arr, 4, 2), merged_expert, 2))
    per_label, per_slice, per_level = [], [], []
    for scheme, arr, truth, n in schemes:
        names = class_map(n)
        spacing = mask.GetSpacing()
        rows = quant.quantify(arr, names, scan, expert=truth, spacing=spacing, **inputs)
        if truth is not None:
            ref = quant.quantify(truth, names, scan, spacing=spacing, **inputs)
            rows["expert_volume_ml"] = ref.volume_ml.to_numpy()
            rows["expert_fat_ratio"] = ref.fat_ratio.to_numpy()
            rows["expert_ct_mean_hu"] = ref.ct_mean_hu.to_numpy()
            rows.loc[rows.label.isin(unannotated[n]), list(EXPERT_COLUMNS)] = np.nan
        per_label.append(rows.assign(scheme=scheme))
        if l4_l5_slice is not None:
            levels = quant.quantify_levels(
                arr, names, l4_l5_slice, scan, expert=truth, spacing=spacing, **inputs
            )
            if truth is not None:
                expert_levels = quant.quantify_levels(
                    truth, names, l4_l5_slice, scan, spacing=spacing, **inputs
                )
                levels["expert_volume_ml"] = expert_levels.volume_ml.to_numpy()
                levels.loc[levels.label.isin(unannotated[n]), ["dice", "expert_volume_ml"]] = np.nan
            per_level.append(levels.assign(scheme=scheme))
        if scheme == f"{k}-class":
            sl = quant.quantify_per_slice(arr, names, scan, expert=truth, spacing=spacing, **inputs)
            if truth is not None:
                sl.loc[sl.label.isin(unannotated[n]), "dice"] = np.nan
            per_slice.append(sl.assign(scheme=scheme))
    labels = pd.concat(per_label, ignore_index=True)
    labels["side"] = labels.class_name.map(side_of)
    levels = pd.concat(per_level, ignore_index=True) if per_level else pd.DataFrame()
    if len(levels):
        levels["side"] = levels.class_name.map(side_of)
    return labels, pd.concat(per_slice, ignore_index=True), levels


def _cached_scan_rows(
    spec: DatasetSpec, layout: DatasetLayout, cache: ScanCache, scan: str, k: int, l4_l5_slice: int | None
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, float | None]:
    """``_scan_rows`` and the laterality gap of one scan, recomputed only when a file they read changed (so a
    new scan costs one scan's metrics, not the dataset's); the rows are always read back from the cache, so
    a fresh and a reused scan give rows of the same types."""
    sources = (
        layout.final_mask_canonical(scan),
        layout.scan_image(scan),
        layout.scan_fat(scan) if spec.is_dixon else None,  # elsewhere <scan>_fat may be another scan
        layout.scan_expert(scan),
    )
    key = cache_key(
        VERSION, k, l4_l5_slice, spec.modality, spec.is_dixon, spec.n_classes,
        *(sha256_file(p) if p is not None and p.exists() else "-" for p in sources),
    )  # fmt: skip
    outputs = [layout.scan_metric_rows(scan, table) for table in SCAN_METRIC_TABLES]

    def compute() -> dict:
        mask = read_image(layout.final_mask_canonical(scan))
        for frame, path in zip(_scan_rows(spec, layout, scan, k, mask, l4_l5_slice), outputs, strict=True):
            atomic_write_dataframe(frame, path)
        return {"laterality_gap": laterality_gap_voxels(sitk.GetArrayViewFromImage(mask), k)}

    info, _ = cache.get_or_compute(scan, key, outputs, compute)
    per_label, per_slice, per_level = (pd.read_parquet(path) for path in outputs)
    return per_label, per_slice, per_level, info["laterality_gap"]


RUN_COLUMNS = ("run_id", "computed_at")  # which run wrote a row, and when: not what the row says


@dataclass
class DatasetMetrics:
    """The dataset's rows for every table ``scan_metrics`` owns, plus what its metadata shows."""

    tables: dict[str, pd.DataFrame]
    n_scans: int
    n_classes: int

    @property
    def labels(self) -> pd.DataFrame:
        return self.tables["scan_metrics"]

    @property
    def flags(self) -> pd.DataFrame:
        return self.tables["qc_flags"]

    @property
    def levels(self) -> pd.DataFrame:
        return self.tables["level_metrics"]

    @property
    def data_version(self) -> str:
        """The rows written, without the run's id and time: a rerun with other QC thresholds that flags
        other scans is a change for the agreement and the report, and an identical rerun is not."""
        return cache_key(
            *(
                f"{name}\n{frame.drop(columns=list(RUN_COLUMNS), errors='ignore').to_csv(index=False)}"
                for name, frame in sorted(self.tables.items())
            )
        )


def _correction_of(stage_row: pd.DataFrame) -> dict:
    """The scan's correction columns from the final masks' table (``refinement.corrections``): whether a
    user corrected it, how many slices, the uncorrected mask's Dice on them and the volume change."""
    if not len(stage_row) or "corrected" not in stage_row:
        return dict(NO_CORRECTION)
    row = stage_row.iloc[0]
    return {column: row[column] for column in NO_CORRECTION}


def dataset_metrics(spec: DatasetSpec, layout: DatasetLayout, qc: QCConfig, run_id: str) -> DatasetMetrics:
    """Volume, HU, fat ratio, Dice vs experts, per-slice areas, confidence, stage agreement and QC flags of
    every scan with a final mask, each row carrying its lineage (model version, code version, run id)."""
    name = spec.name
    final = json.loads(layout.final_summary.read_text())
    k = int(final["n_classes"])
    stage_table = (
        pd.read_parquet(layout.stage_agreement) if layout.stage_agreement.exists() else pd.DataFrame()
    )
    selection = (
        pd.read_parquet(layout.pseudo_selection) if layout.pseudo_selection.exists() else pd.DataFrame()
    )
    lineage = {
        "dataset": name,
        "model_stage": "stage3",
        "model_version": final["models"]["stage3"],
        "code_version": VERSION,
        "run_id": run_id,
        "computed_at": pd.Timestamp.now(tz="UTC"),
    }
    stage_cols = [
        c for c in ("stage1_vs_propagation", "stage2_vs_stage1", "stage3_vs_stage2") if c in stage_table
    ]
    manifest = read_manifest(layout)
    cache = ScanCache(layout.dir("scan_metrics"))
    labels, slices, levels, confidence, scan_rows = [], [], [], [], []
    for scan in ok_scans(layout, manifest):
        if not layout.final_mask_canonical(scan).exists():
            continue
        split = manifest.l4_l5_slice.get(scan) if "l4_l5_slice" in manifest else None
        split = None if split is None or pd.isna(split) else int(split)
        per_label, per_slice, per_level, gap = _cached_scan_rows(spec, layout, cache, scan, k, split)
        levels.append(per_level)
        conf = pd.read_parquet(layout.confidence(scan))
        backend, model_id = str(conf.backend.iloc[0]), str(conf.model_id.iloc[0])
        stage_row = stage_table[stage_table.scan == scan] if len(stage_table) else pd.DataFrame()
        labels.append(
            per_label.assign(backend=backend, propagation_model=model_id, **_correction_of(stage_row))
        )
        slices.append(per_slice)
        if len(selection):
            kept = selection[selection.scan == scan][["slice", "kept"]]
            conf = conf.merge(kept, on="slice", how="left")
        confidence.append(conf.drop(columns=["scan"], errors="ignore").assign(scan=scan))
        scan_rows.append(
            {
                "dataset": name,
                "scan": scan,
                "mean_confidence": mean_confidence(conf),
                "backend": backend,
                "stage_dice_min": float(stage_row[stage_cols].min(axis=1).iloc[0])
                if len(stage_row)
                else np.nan,
                "fragment_fraction": final["fragment_fraction"][scan],
                "laterality_gap": np.nan if gap is None else gap,
            }
        )
    cache.forget_unseen()
    label_df = pd.concat(labels, ignore_index=True).assign(**lineage) if labels else pd.DataFrame()
    slice_df = pd.concat(slices, ignore_index=True).assign(**lineage) if slices else pd.DataFrame()
    levels = [frame for frame in levels if len(frame)]
    level_df = pd.concat(levels, ignore_index=True).assign(**lineage) if levels else pd.DataFrame()
    conf_df = pd.concat(confidence, ignore_index=True).assign(**lineage) if confidence else pd.DataFrame()
    stage_df = stage_table.assign(**lineage) if len(stage_table) else pd.DataFrame()
    qc_input = label_df[label_df.scheme == f"{k}-class"].rename(columns={"ct_mean_hu": "hu_mean"})
    qc_input = qc_input.assign(label=qc_input.class_name)
    no_input = pd.DataFrame(columns=list(QC_FLAG_COLUMNS))
    flags = qc_flags(pd.DataFrame(scan_rows), qc_input, qc) if len(qc_input) else no_input
    # with lineage even when there is no flag row: the table and its columns must exist for the documented
    # queries (the store types columns without values as text)
    flags = flags.assign(**{k_: v for k_, v in lineage.items() if k_ != "dataset"})
    if len(flags):
        per_scan_flags = flags.groupby("scan").flag.apply(lambda f: ",".join(sorted(set(f))))
        label_df["qc_flags"] = label_df.scan.map(per_scan_flags).fillna("")
    elif len(label_df):
        label_df["qc_flags"] = ""
    tables = {
        "scan_metrics": label_df,
        "slice_metrics": slice_df,
        "level_metrics": level_df,
        "slice_confidence": conf_df,
        "stage_agreement": stage_df,
        "qc_flags": flags,
    }
    return DatasetMetrics(tables, len(scan_rows), k)


def agreement_with_experts(rows: pd.DataFrame, name: str, run_id: str) -> tuple[pd.DataFrame, bytes | None]:
    """Per scheme, label and measure: paired TOST at +-5 % and +-10 % of the manual mean, ICC(3,1) and
    ICC(2,1), Bland-Altman, MAE and Spearman, from the dataset's ``scan_metrics`` rows; plus one
    Bland-Altman PNG (volume) when at least 3 scans have experts."""
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
                plot = agreement_plots.bland_altman_png(
                    group[measure], group[expert_col], f"{name} {label} volume", units=UNITS[measure]
                )
    table = pd.DataFrame(out)
    if len(table):
        table = table.assign(
            # yes, no or not computed (n < 3): a boolean column whatever rows the first writer had, where
            # all-missing rows had typed it DOUBLE and every later dataset's answer became 1.0 or 0.0
            tost_equivalent=table.tost_equivalent.astype("boolean"),
            code_version=AGREEMENT_VERSION,
            run_id=run_id,
            computed_at=pd.Timestamp.now(tz="UTC"),
        )
    return table, plot


@dataclass
class DatasetAgreement:
    rows: pd.DataFrame  # the dataset's scan_metrics rows the agreement was computed from
    table: pd.DataFrame
    plot: bytes | None
    written: int


def write_agreement(
    connect: Callable[[], AbstractContextManager], name: str, run_id: str
) -> DatasetAgreement:
    """The ``agreement`` asset's step: read the dataset's ``scan_metrics`` rows, compute the agreement with
    the experts, and replace the dataset's ``agreement`` rows. ``connect`` opens a DuckDB connection; one is
    opened to read and another to write, so no lock is held while the statistics run."""
    with connect() as con:
        rows = con.execute(f"SELECT * FROM {SCHEMA}.scan_metrics WHERE dataset = ?", [name]).df()
    table, plot = agreement_with_experts(rows, name, run_id)
    with connect() as con:
        written = replace_dataset_rows(
            con, name, {"agreement": table if len(table) else pd.DataFrame(columns=["dataset"])}
        )
    return DatasetAgreement(rows, table, plot, written["agreement"])
