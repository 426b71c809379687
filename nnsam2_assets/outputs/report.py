"""The cohort report of one dataset: a self-contained HTML page (figures embedded, nothing fetched) that opens
in any browser, with the same rows as CSV and XLSX beside it.

Every number comes from the DuckDB rows the metrics assets wrote (``metrics.scan_metrics``,
``level_metrics``, ``qc_flags``, ``agreement``), so the page and ``nnsam2 sql`` never disagree; the figures
come from the scan and final-mask files. Dagster-free.
"""

from __future__ import annotations

import base64
import html
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from nnsam2_assets.core.imaging import read_array
from nnsam2_assets.core.layout import DatasetLayout
from nnsam2_assets.core.overlays import montage_png
from nnsam2_assets.core.storage import atomic_write_bytes, atomic_write_text
from nnsam2_assets.ingest.annotation import MAX_ANNOTATED_SLICES, describe_split_source
from nnsam2_assets.ingest.convention import DatasetSpec
from nnsam2_assets.ingest.errors import DatasetError
from nnsam2_assets.ingest.scans import read_manifest
from nnsam2_assets.metrics import agreement_plots
from nnsam2_assets.metrics.store import dataset_tables

# v2: where the ES/MF split comes from, and the caution for one annotated level; v3: its wording is the final
# masks' own, and click-prompted datasets are told to draw
VERSION = "report-v3"
MEASURE_COLUMNS = {"volume_ml": "volume (mL)", "fat_ratio": "fat ratio", "ct_mean_hu": "HU", "dice": "Dice"}
LEVEL_COLUMNS = {
    "volume_ml": "volume (mL)",
    "mean_csa_mm2": "mean CSA (mm²)",
    "fat_ratio": "fat ratio",
    "ct_mean_hu": "HU",
}
DIGITS = {
    "volume_ml": 2,
    "fat_ratio": 4,
    "ct_mean_hu": 1,
    "dice": 3,
    "mean_csa_mm2": 1,
    "expert_volume_ml": 2,
}


@dataclass(frozen=True)
class Report:
    html: Path
    csv: dict[str, Path]
    xlsx: Path
    n_scans: int
    n_flags: int


def report_paths(layout: DatasetLayout) -> dict[str, Path]:
    base = layout.dir("cohort_report")
    return {
        "html": base / "report.html",
        "scans": base / "scans.csv",
        "levels": base / "levels.csv",
        "qc": base / "qc.csv",
        "sides": base / "sides.csv",
        "xlsx": base / "report.xlsx",
    }


# agreement columns in the units of the row's measure: a fat-ratio bias of -0.0004 had printed as -0.000
IN_MEASURE_UNITS = ("bias", "loa_lower", "loa_upper", "mae")
ALPHA = 0.05  # the TOST level the agreement table's "equivalent" column is decided at


def p_value(p: float) -> str:
    """A p-value with the significant digits it needs never to print on the other side of ``ALPHA`` than it
    lies (0.0496 and 0.0504 had both printed 0.050 beside "yes" and "no"), and "<0.001" below 0.001."""
    if p < 0.001:
        return "<0.001"
    for digits in range(2, 9):
        text = f"{p:.{digits}g}"
        if (float(text) < ALPHA) == (p < ALPHA):
            return text
    return f"{p:.8g}"


def cell(value: object, column: str, measure: str | None = None) -> str:
    """A number as the report prints it (the test reads the page back through this same rule); ``measure``
    is an agreement row's measure, whose units its bias, limits and error are in."""
    # a missing value: None, NaN, or pandas' NA, which a BOOLEAN column read back from DuckDB holds
    if value is None or (pd.api.types.is_scalar(value) and pd.isna(value)):
        return "–"
    if column == "tost_equivalent" or isinstance(value, (bool, np.bool_)):
        return "yes" if bool(value) else "no"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        if column == "tost_p":
            return p_value(float(value))
        digits = DIGITS.get(measure or "", 3) if column in IN_MEASURE_UNITS else DIGITS.get(column, 3)
        return f"{float(value):.{digits}f}"
    return str(value)


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _table(df: pd.DataFrame, columns: dict[str, str], row_attrs=None, css: str = "") -> str:
    head = "".join(f"<th>{html.escape(label)}</th>" for label in columns.values())
    body = []
    for _, row in df.iterrows():
        attrs = row_attrs(row) if row_attrs else ""
        cells = "".join(
            f'<td data-col="{c}">{html.escape(cell(row.get(c), c, row.get("measure")))}</td>' for c in columns
        )
        body.append(f"<tr{attrs}>{cells}</tr>")
    return f'<table class="{css}"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def build_report(spec: DatasetSpec, layout: DatasetLayout, db: Path) -> Report:
    """Write the dataset's report.html, its CSVs and report.xlsx under ``cohort_report/``; return their paths."""
    name = spec.name
    k = spec.n_classes
    rows = dataset_tables(db, ("scan_metrics", "level_metrics", "qc_flags", "agreement"), name)
    if not layout.manifest.exists():  # another dataset's run made the database: this one has nothing yet
        raise DatasetError(f"dataset {name!r} has not been run yet: `nnsam2 run` first")
    labels, levels, flags, agreement = rows.values()
    # per side for every dataset: a 4-class dataset's sides do not depend on its muscle split (the caution)
    sides = labels[labels.scheme == "2-class"] if len(labels) else labels
    labels = labels[labels.scheme == f"{k}-class"] if len(labels) else labels
    levels = levels[levels.scheme == f"{k}-class"] if len(levels) else levels
    if not len(flags):  # no dataset raised a flag yet: the table may not even exist
        flags = pd.DataFrame(columns=["dataset", "scan", "flag", "severity", "detail"])
    manifest = read_manifest(layout)
    excluded = manifest[manifest.status != "ok"].reset_index() if len(manifest) else pd.DataFrame()
    summary = json.loads(layout.final_summary.read_text()) if layout.final_summary.exists() else {}
    paths = report_paths(layout)

    sections = [
        _provenance(spec, labels, summary),
        _muscle_split_caution(summary),
        _qc_summary(flags),
        _scans(spec, layout, labels, levels, flags, sides if k == 4 else sides.iloc[:0]),
    ]
    if len(excluded):
        sections.append(
            "<h2>Excluded scans</h2>" + _table(excluded, {"scan": "scan", "error": "reason"}, css="excluded")
        )
    sections.append(_agreement(labels, agreement, spec))
    sections.append(HOW_TO_READ)
    page = PAGE.format(title=html.escape(f"nnsam2 report: {name}"), body="\n".join(sections))
    atomic_write_text(page, paths["html"])

    scan_rows = labels.drop(columns=["computed_at"], errors="ignore")
    tables = {
        "scans": scan_rows,
        "levels": levels.drop(columns=["computed_at"], errors="ignore"),
        "qc": flags,
        "sides": sides.drop(columns=["computed_at"], errors="ignore"),
    }
    for key, df in tables.items():
        atomic_write_text(df.to_csv(index=False), paths[key])
    buffer = io.BytesIO()
    with pd.ExcelWriter(buffer, engine="openpyxl") as writer:
        for key, df in {**tables, "agreement": agreement}.items():
            df.drop(columns=["computed_at"], errors="ignore").to_excel(writer, sheet_name=key, index=False)
    atomic_write_bytes(buffer.getvalue(), paths["xlsx"])
    return Report(
        paths["html"],
        {k_: paths[k_] for k_ in tables},
        paths["xlsx"],
        labels.scan.nunique() if len(labels) else 0,
        len(flags),
    )


def _provenance(spec: DatasetSpec, labels: pd.DataFrame, summary: dict) -> str:
    first = labels.iloc[0] if len(labels) else {}
    facts = {
        "dataset": spec.name,
        "modality / sequence": f"{spec.modality} / {spec.sequence}",
        "classes": ", ".join(spec.class_names),
        "reference scan": spec.reference,
        "propagation backend": first.get("backend", "–") if len(labels) else "–",
        "propagation model": first.get("propagation_model", "–") if len(labels) else "–",
        "nnU-Net models": ", ".join(
            f"{stage} {version}" for stage, version in summary.get("models", {}).items()
        )
        or "–",
        "final masks from": (summary.get("refinement_decision") or {}).get("source", "–"),
        "ES/MF split from": describe_split_source(summary.get("es_mf_split_slices")),
        "metrics code version": first.get("code_version", "–") if len(labels) else "–",
        "run id": first.get("run_id", "–") if len(labels) else "–",
        "computed at": str(first.get("computed_at", "–")) if len(labels) else "–",
        "report": VERSION,
    }
    rows = "".join(
        f'<tr><th>{html.escape(k)}</th><td data-fact="{html.escape(k)}">{html.escape(str(v))}</td></tr>'
        for k, v in facts.items()
    )
    return f'<h1>nnsam2 report: {html.escape(spec.name)}</h1><table class="facts">{rows}</table>'


def _muscle_split_caution(summary: dict) -> str:
    """A 4-class dataset annotated on one slice: propagation and the models carry that level's erector
    spinae / multifidus split to every level, raised caudally only by the anatomy's least rise
    (``refinement.muscle_split``), while the multifidus' share of a side changes several-fold between L3 and
    S1, by an amount that differs between people. Side (2-class) numbers do not depend on the split."""
    if len(summary.get("es_mf_split_slices") or []) != 1:
        return ""
    if summary.get("heldout_truth") == "click-made mask":
        # click prompts mark one slice; more levels need a drawn annotation
        advice = (
            "For per-muscle results, replace the click prompts with a drawn annotation that also holds a slice "
            f"near each end of the region (up to {MAX_ANNOTATED_SLICES} slices)."
        )
    else:
        advice = (
            "For per-muscle results, annotate a slice near each end of the region as well (the dataset's "
            f"annotation may hold up to {MAX_ANNOTATED_SLICES} slices)."
        )
    return (
        '<p class="caution" data-caution="es-mf-split">Per-muscle numbers (erector spinae, multifidus) carry '
        "the split between the two muscles from the one annotated slice to every level, raised caudally only by "
        "the least rise the anatomy shows; the multifidus' share of a side grows several-fold from L3 to S1, by "
        "an amount that differs between people, so per-muscle volumes and fat ratios can be far off away "
        f'from that level. Per-side numbers ("Per side" under each scan, sides.csv) do not depend on it. {advice}</p>'
    )


def _qc_summary(flags: pd.DataFrame) -> str:
    if not len(flags):
        return '<h2>Quality control</h2><p class="ok">No QC flag was raised.</p>'
    # a scan counts once per flag: several flags are raised per class (an empty class, an outlying one)
    counts = flags.groupby(["severity", "flag"]).scan.nunique().reset_index(name="scans")
    return "<h2>Quality control</h2>" + _table(
        counts,
        {"severity": "severity", "flag": "flag", "scans": "scans"},
        row_attrs=lambda r: f' class="flag-{str(r.severity).lower()}"',
        css="qc",
    )


def _correction_note(row: pd.Series) -> str:
    """A corrected scan: how many slices a user corrected, the volume change and how well the uncorrected
    mask agreed with the correction there."""
    corrected = row.get("corrected", False)
    if pd.isna(corrected) or not bool(corrected):  # NULL: rows written before corrections were recorded
        return ""
    return (
        f'<p class="corrected">corrected by a user on {int(row.n_corrected_slices)} slice(s): volume '
        f"{row.correction_volume_change_ml:+.1f} mL; Dice of the uncorrected mask on those slices "
        f"{row.correction_dice:.3f}</p>"
    )


def _scans(
    spec: DatasetSpec,
    layout: DatasetLayout,
    labels: pd.DataFrame,
    levels: pd.DataFrame,
    flags: pd.DataFrame,
    sides: pd.DataFrame,
) -> str:
    measures = {
        "class_name": "class",
        **{c: t for c, t in MEASURE_COLUMNS.items() if c in labels and labels[c].notna().any()},
    }
    if "expert_volume_ml" in labels and labels.expert_volume_ml.notna().any():
        measures["expert_volume_ml"] = "expert volume (mL)"
    blocks = ["<h2>Scans</h2>"]
    for scan, rows in labels.groupby("scan", sort=True) if len(labels) else []:
        scan_flags = flags[flags.scan == scan] if len(flags) else flags
        worst = "error" if (scan_flags.severity == "ERROR").any() else "warn" if len(scan_flags) else "ok"
        shown = ", ".join(f"{f.severity} {f.flag}" for f in scan_flags.itertuples()) or "no QC flag"
        figure = ""
        if layout.final_mask_canonical(scan).exists():
            figure = _img(
                montage_png(
                    read_array(layout.scan_image(scan)),
                    read_array(layout.final_mask_canonical(scan)),
                    spec.n_classes,
                ),
                f"{scan} final mask",
            )

        def class_attrs(r, s=scan):
            return f' data-scan="{html.escape(s)}" data-class="{html.escape(r.class_name)}"'

        table = _table(rows, measures, row_attrs=class_attrs, css="measures")
        level_rows = levels[levels.scan == scan] if len(levels) else levels
        level_html = _part(
            "Per level",
            level_rows,
            {"level": "level", "class_name": "class", **LEVEL_COLUMNS},
            lambda r, s=scan: (
                f' data-scan="{html.escape(s)}" data-level="{html.escape(r.level)}"'
                f' data-class="{html.escape(r.class_name)}"'
            ),
            "levels",
        )
        # a 4-class dataset's per-side numbers, the same as a 2-class dataset's own rows
        side_html = _part(
            "Per side", sides[sides.scan == scan] if len(sides) else sides, measures, class_attrs, "sides"
        )
        blocks.append(
            f'<section class="scan qc-{worst}" data-scan="{html.escape(scan)}"><h3>{html.escape(scan)}</h3>'
            f'<p class="flags">{html.escape(shown)}</p>{_correction_note(rows.iloc[0])}'
            f'<div class="row">{figure}<div>{table}{side_html}{level_html}</div></div></section>'
        )
    return "\n".join(blocks)


def _part(title: str, rows: pd.DataFrame, columns: dict[str, str], row_attrs, css: str) -> str:
    """A scan's sub-table under its heading, with the columns that hold a value in its rows; "" without rows."""
    if not len(rows):
        return ""
    shown = {
        c: t
        for c, t in columns.items()
        if c in rows and (c in ("level", "class_name") or rows[c].notna().any())
    }
    return f"<h4>{html.escape(title)}</h4>" + _table(rows, shown, row_attrs=row_attrs, css=css)


def _agreement(labels: pd.DataFrame, agreement: pd.DataFrame, spec: DatasetSpec) -> str:
    if not len(agreement):
        return "<h2>Agreement with experts</h2><p>No expert labels: no agreement statistics.</p>"
    columns = {
        "label": "class",
        "measure": "measure",
        "n": "n",
        "tost_margin": "TOST margin",
        "tost_p": "TOST p",
        "tost_equivalent": "equivalent",
        "icc3_1": "ICC(3,1)",
        "icc2_1": "ICC(2,1)",
        "bias": "BA bias",
        "loa_lower": "LoA low",
        "loa_upper": "LoA high",
        "mae": "MAE",
    }
    columns = {c: t for c, t in columns.items() if c in agreement}
    shown = agreement[agreement.scheme == f"{spec.n_classes}-class"] if "scheme" in agreement else agreement
    figures = []
    for measure, expert in (
        ("volume_ml", "expert_volume_ml"),
        ("fat_ratio", "expert_fat_ratio"),
        ("ct_mean_hu", "expert_ct_mean_hu"),
    ):
        if expert not in labels:
            continue
        pairs = labels[[measure, expert]].dropna()
        if len(pairs) < 3:  # expert values, but too few AI values beside them (empty masks): no figure
            continue
        figures.append(
            _img(
                agreement_plots.bland_altman_png(
                    pairs[measure], pairs[expert], f"{spec.name}: {measure}, all classes"
                ),
                f"Bland-Altman {measure}",
            )
        )
        figures.append(
            _img(
                agreement_plots.scatter_png(pairs[measure], pairs[expert], f"{spec.name}: {measure}"),
                f"scatter {measure}",
            )
        )
    return (
        "<h2>Agreement with experts</h2>"
        + _table(shown, columns, css="agreement")
        + '<div class="row">'
        + "".join(figures)
        + "</div>"
    )


HOW_TO_READ = """<h2>How to read this</h2>
<ul>
<li><b>Volume</b> is the mask's voxel count times the voxel volume, over the region between the L3/L4 and L5/S1
discs. <b>Fat ratio</b> (Dixon) is Σfat / (Σfat + Σwater) over the mask; <b>HU</b> (CT) is the mean attenuation.</li>
<li><b>Per level</b>: the region split at the L4/L5 disc; the L4/L5 slice belongs to the upper segment.</li>
<li><b>Dice</b> compares the mask with the expert's labels, where they exist (1 = identical).</li>
<li><b>QC flags</b>: ERROR (red) means the mask is unusable as it stands (empty, sides swapped); WARN (amber) asks for a
look (low propagation confidence, disagreement between refinement stages, fragments, asymmetry, outliers).</li>
<li><b>Agreement</b>: TOST tests equivalence with the expert within the margin (p &lt; 0.05: equivalent); ICC is the
intraclass correlation; Bland–Altman gives the bias and the 95 % limits of agreement.</li>
<li>The same rows are in scans.csv, levels.csv, qc.csv and report.xlsx beside this file, and in DuckDB
(<code>nnsam2 sql</code>).</li>
</ul>"""

PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'">
<title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 1200px; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1em; font-size: 0.9em; }}
th, td {{ border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }}
td[data-col] {{ text-align: right; font-variant-numeric: tabular-nums; }}
.row {{ display: flex; gap: 1.5em; align-items: flex-start; flex-wrap: wrap; }}
section.scan {{ border-left: 6px solid #4a4; padding: 0.2em 1em; margin: 1em 0; }}
section.qc-warn {{ border-left-color: #e9a100; background: #fff8e6; }}
section.qc-error {{ border-left-color: #c22; background: #fdecec; }}
tr.flag-error td {{ background: #fdecec; }} tr.flag-warn td {{ background: #fff8e6; }}
.flags {{ font-weight: 600; }} .ok {{ color: #282; }}
.caution {{ border-left: 6px solid #e9a100; background: #fff8e6; padding: 0.4em 1em; }}
</style></head>
<body>
{body}
<script>
// self-check: every figure decoded (the browser test reads this attribute)
window.addEventListener("load", () => {{
  const images = Array.from(document.images);
  const broken = images.filter(i => !i.complete || i.naturalWidth === 0).length;
  document.body.dataset.images = images.length;
  document.body.dataset.brokenImages = broken;
  if (broken) console.error(broken + " figure(s) failed to load");
}});
</script>
</body></html>
"""
