"""Output assets: the per-dataset cohort report (HTML with CSV and XLSX beside it)."""

from pathlib import Path

import dagster as dg
from dagster_duckdb import DuckDBResource

from nnsam2_assets.defs.automation import EAGER
from nnsam2_assets.defs.ingest import scans
from nnsam2_assets.defs.metrics import agreement, scan_metrics
from nnsam2_assets.defs.partitions import datasets_partitions
from nnsam2_assets.defs.refinement import final_masks
from nnsam2_assets.defs.resources import NnsamStorage
from nnsam2_assets.outputs import report


@dg.asset(
    partitions_def=datasets_partitions,
    group_name="metrics",
    kinds={"html"},
    code_version=report.VERSION,
    automation_condition=EAGER,
    # scans: the images under the overlays and the excluded scans; final_masks: the overlays; scan_metrics
    # (with level and QC rows) and agreement: every number
    deps=[scans, final_masks, scan_metrics, agreement],
)
def cohort_report(
    context: dg.AssetExecutionContext, storage: NnsamStorage, metrics_db: DuckDBResource
) -> dg.MaterializeResult:
    """One self-contained HTML page per dataset (figures embedded, opens offline in any browser): provenance,
    each scan's overlay, measurements per muscle and level and QC flags, excluded scans, agreement with the
    experts with Bland–Altman and scatter plots; its rows also as CSV and XLSX."""
    name = context.partition_key
    built = report.build_report(storage.dataset(name), storage.layout(name), Path(metrics_db.database))
    return dg.MaterializeResult(
        metadata={
            "report": dg.MetadataValue.path(str(built.html)),
            "xlsx": dg.MetadataValue.path(str(built.xlsx)),
            "csv": dg.MetadataValue.json({k: str(v) for k, v in built.csv.items()}),
            "n_scans": built.n_scans,
            "n_flags": built.n_flags,
            "size_kb": round(built.html.stat().st_size / 1024, 1),
        }
    )
