"""The demo's cohort reports in headless Chromium with every network request failing: the page renders,
every figure decodes, the console stays silent, nothing but the file itself is requested, and the numbers
on the page are DuckDB's. Also: the CSV and XLSX beside it, and no DICOM-SEG for a NIfTI-only cohort."""

from __future__ import annotations

import re
from html.parser import HTMLParser

import openpyxl
import pandas as pd
import pytest

from nnsam2_assets.core.layout import DatasetLayout
from nnsam2_assets.metrics.store import query
from nnsam2_assets.outputs.report import cell, report_paths
from nnsam2_assets.testing.browser import OFFLINE, chromium
from nnsam2_assets_tests.ops import REPO


class _Cells(HTMLParser):
    """Collects the measurement cells: (table kind, scan, level, class, column) -> text; and <body>'s data."""

    def __init__(self) -> None:
        super().__init__()
        self.cells: dict[tuple, str] = {}
        self.body: dict[str, str] = {}
        self.images = 0
        self._row: dict | None = None
        self._col: str | None = None
        self._table: str = ""

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "body":
            self.body = a
        elif tag == "img":
            self.images += 1
        elif tag == "table":
            self._table = a.get("class", "")
        elif tag == "tr" and "data-scan" in a:
            self._row = a
        elif tag == "td" and self._row is not None and "data-col" in a:
            self._col = a["data-col"]

    def handle_data(self, data):
        if self._col is not None:
            r = self._row
            key = (self._table, r["data-scan"], r.get("data-level", ""), r["data-class"], self._col)
            self.cells[key] = self.cells.get(key, "") + data

    def handle_endtag(self, tag):
        if tag == "td":
            self._col = None
        elif tag == "tr":
            self._row = None


def _load(url: str, tmp_path, tag: str):
    """The page's DOM after load (scripts run), and every URL the browser requested over the network."""
    netlog = tmp_path / f"{tag}.net.json"
    dom = chromium(
        url,
        tmp_path / f"{tag}-profile",
        *OFFLINE,
        "--dump-dom",
        f"--log-net-log={netlog}",
        "--enable-logging=stderr",
        "--v=0",
    )
    return dom, set(re.findall(r'"url":"([^"]+)"', netlog.read_text())) if netlog.exists() else set()


@pytest.mark.parametrize("dataset", ["demo-dixon", "demo-ct"])
def test_the_demo_report_renders_offline_with_every_figure_and_duckdb_numbers(demo_cohort, tmp_path, dataset):
    paths = report_paths(DatasetLayout(demo_cohort.storage_root, dataset))
    page = paths["html"]
    assert page.exists(), "cohort_report was not materialized by the demo run"
    url = page.as_uri()
    # the detector itself: a page that fetches an image over the network shows up in the net log
    control = tmp_path / "control.html"
    control.write_text('<html><body><img src="http://nnsam2.invalid/figure.png"></body></html>')
    _, control_requests = _load(control.as_uri(), tmp_path, "control")
    assert any("nnsam2.invalid" in u for u in control_requests), control_requests
    dom, requested = _load(url, tmp_path, "report")
    assert dom.returncode == 0, dom.stderr[-2000:]
    # the report asks for nothing (figures are data: URIs; its CSP forbids anything else); Chromium's own
    # service calls (network time, component updates) are the browser's, and fail like any request here
    page_requests = {
        u for u in requested if not re.match(r"https?://[^/]*(google\.com|gvt1\.com|googleapis\.com)/", u)
    }
    assert not page_requests, page_requests
    assert "CONSOLE" not in dom.stderr and "Refused to" not in dom.stderr, dom.stderr[-2000:]

    cells = _Cells()
    cells.feed(dom.stdout)
    assert cells.images >= 2
    assert cells.body.get("data-images") == str(cells.images) and cells.body.get("data-broken-images") == "0"

    k = 4 if dataset == "demo-dixon" else 2
    rows = query(
        demo_cohort.duckdb,
        f"SELECT * FROM metrics.scan_metrics WHERE dataset = '{dataset}' AND scheme = '{k}-class'",
    )
    levels = query(
        demo_cohort.duckdb,
        f"SELECT * FROM metrics.level_metrics WHERE dataset = '{dataset}' AND scheme = '{k}-class'",
    )
    measured = ["volume_ml", "dice", "expert_volume_ml"] + (["fat_ratio"] if k == 4 else ["ct_mean_hu"])
    checked = 0
    for row in rows.itertuples():
        for column in measured:
            assert cells.cells[("measures", row.scan, "", row.class_name, column)] == cell(
                getattr(row, column), column
            )
            checked += 1
    for row in levels.itertuples():
        assert cells.cells[("levels", row.scan, row.level, row.class_name, "volume_ml")] == cell(
            row.volume_ml, "volume_ml"
        )
        checked += 1
    assert checked == len(rows) * len(measured) + len(levels) and len(levels) == 2 * len(rows)
    # every dataset's per-side rows beside the page; a 4-class dataset's on it too ("Per side"), whose caution
    # points there: they had been in no table, CSV or sheet
    sides = query(
        demo_cohort.duckdb,
        f"SELECT * FROM metrics.scan_metrics WHERE dataset = '{dataset}' AND scheme = '2-class'",
    )
    assert len(sides) == 2 * rows.scan.nunique()
    on_page = {key: text for key, text in cells.cells.items() if key[0] == "sides"}
    if k == 4:
        for row in sides.itertuples():
            for column in ("volume_ml", "fat_ratio"):
                assert on_page[("sides", row.scan, "", row.class_name, column)] == cell(
                    getattr(row, column), column
                )
        assert len(on_page) == len(sides) * len({key[4] for key in on_page})
    else:
        assert not on_page  # the scans' own rows are the sides
    assert len(pd.read_csv(paths["sides"])) == len(sides)

    screenshot = REPO / "test-artifacts" / f"report_{dataset}.png"
    screenshot.parent.mkdir(exist_ok=True)
    shot = chromium(url, tmp_path / "profile", *OFFLINE, f"--screenshot={screenshot}", window="1300,2400")
    assert shot.returncode == 0 and screenshot.stat().st_size > 20_000

    # the same rows beside the page
    assert len(pd.read_csv(paths["scans"])) == len(rows)
    assert len(pd.read_csv(paths["levels"])) == len(levels)
    book = openpyxl.load_workbook(paths["xlsx"], read_only=True)
    assert {"scans", "levels", "qc", "sides", "agreement"} <= set(book.sheetnames)
    assert book["scans"].max_row == len(rows) + 1


def test_a_nifti_only_cohort_has_its_report_and_no_dicom_seg(demo_cohort):
    for dataset in demo_cohort.datasets:
        layout = DatasetLayout(demo_cohort.storage_root, dataset)
        assert report_paths(layout)["html"].exists()
        assert not list(layout.dir("final_masks").glob("*.seg.dcm"))


def test_a_report_of_a_database_without_any_qc_flag_says_so(demo_cohort, tmp_path):
    """A fresh database where no dataset raised a flag has no qc_flags table at all (the demo run that
    found this failed at cohort_report)."""
    import shutil

    import duckdb

    from nnsam2_assets.ingest.convention import load_dataset
    from nnsam2_assets.outputs.report import build_report

    storage = tmp_path / "storage"
    shutil.copytree(demo_cohort.storage_root / "datasets" / "demo-dixon", storage / "datasets" / "demo-dixon")
    db = storage / "nnsam2.duckdb"
    shutil.copy(demo_cohort.duckdb, db)
    with duckdb.connect(str(db)) as con:
        con.execute("DROP TABLE IF EXISTS metrics.qc_flags")
    built = build_report(
        load_dataset(demo_cohort.data_root, "demo-dixon"), DatasetLayout(storage, "demo-dixon"), db
    )
    page = built.html.read_text()
    assert "No QC flag was raised." in page and built.n_flags == 0
    assert page.count('class="scan qc-ok"') == built.n_scans == 4


def test_a_four_class_dataset_annotated_on_one_slice_is_told_its_muscle_split_comes_from_that_level(
    demo_cohort, tmp_path
):
    """The demo Dixon dataset is 4-class with one annotated slice: the report names that slice as the source
    of the ES/MF split and cautions about per-muscle numbers; with a second annotated level it names both and
    the caution goes; a 2-class dataset has no split to caution about; final masks written before the field
    leave it unknown; a click-prompted dataset is told to draw its annotation."""
    import json
    import shutil

    from nnsam2_assets.ingest.convention import load_dataset
    from nnsam2_assets.outputs.report import build_report

    storage = tmp_path / "storage"
    for dataset in ("demo-dixon", "demo-ct"):
        shutil.copytree(demo_cohort.storage_root / "datasets" / dataset, storage / "datasets" / dataset)

    def report(dataset: str) -> str:
        layout = DatasetLayout(storage, dataset)
        return build_report(
            load_dataset(demo_cohort.data_root, dataset), layout, demo_cohort.duckdb
        ).html.read_text()

    layout = DatasetLayout(storage, "demo-dixon")
    summary = json.loads(layout.final_summary.read_text())
    (seed,) = summary["es_mf_split_slices"]
    page = report("demo-dixon")
    assert 'data-caution="es-mf-split"' in page
    assert (
        f'<td data-fact="ES/MF split from">annotated slice {seed} of the reference&#x27;s region, from its inferior end</td>'
        in page
    )

    summary["es_mf_split_slices"] = [seed, seed + 2]
    layout.final_summary.write_text(json.dumps(summary))
    page = report("demo-dixon")
    assert 'data-caution="es-mf-split"' not in page
    assert (
        f'<td data-fact="ES/MF split from">annotated slices {seed}, {seed + 2} of the reference&#x27;s region, from its inferior end</td>'
        in page
    )

    assert json.loads(DatasetLayout(storage, "demo-ct").final_summary.read_text())["es_mf_split_slices"] == []
    page = report("demo-ct")
    assert 'data-caution="es-mf-split"' not in page
    assert '<td data-fact="ES/MF split from">none (2-class masks)</td>' in page

    # final masks written before the field: the report says it does not know, and cautions about nothing
    del summary["es_mf_split_slices"]
    layout.final_summary.write_text(json.dumps(summary))
    page = report("demo-dixon")
    assert '<td data-fact="ES/MF split from">unknown (final masks written before' in page
    assert 'data-caution="es-mf-split"' not in page

    # a click-prompted dataset marks one slice: the advice is a drawn annotation, not more clicks
    summary |= {"es_mf_split_slices": [seed], "heldout_truth": "click-made mask"}
    layout.final_summary.write_text(json.dumps(summary))
    page = report("demo-dixon")
    assert (
        'data-caution="es-mf-split"' in page and "replace the click prompts with a drawn annotation" in page
    )


def test_a_report_reads_one_committed_state_of_the_database(demo_cohort, tmp_path, monkeypatch):
    """A rerun committing between two of the report's table reads once gave a page whose scans came from
    one run and whose levels, flags and agreement came from the next. Here a writer empties the dataset's
    rows before every read but the first: every table must still be the first state's."""
    import shutil

    from nnsam2_assets.ingest.convention import load_dataset
    from nnsam2_assets.metrics import store
    from nnsam2_assets.outputs.report import build_report

    storage = tmp_path / "storage"
    shutil.copytree(demo_cohort.storage_root / "datasets" / "demo-dixon", storage / "datasets" / "demo-dixon")
    db = storage / "nnsam2.duckdb"
    shutil.copy(demo_cohort.duckdb, db)
    tables = ("scan_metrics", "level_metrics", "qc_flags", "agreement")
    before = store.dataset_tables(db, tables, "demo-dixon")
    assert all(len(before[t]) for t in ("scan_metrics", "level_metrics", "agreement"))

    reads, read = [], store._read

    def read_after_a_rerun(*args, **kwargs):
        if reads:
            store.replace_dataset(db, "demo-dixon", {t: before[t].iloc[:0] for t in tables})
        reads.append(1)
        return read(*args, **kwargs)

    monkeypatch.setattr(store, "_read", read_after_a_rerun)
    spec = load_dataset(demo_cohort.data_root, "demo-dixon")
    built = build_report(spec, DatasetLayout(storage, "demo-dixon"), db)
    scans, levels = (pd.read_csv(built.csv[key]) for key in ("scans", "levels"))
    agreement = pd.read_excel(built.xlsx, sheet_name="agreement")
    k = f"{spec.n_classes}-class"
    assert len(scans) == (before["scan_metrics"].scheme == k).sum()
    assert len(levels) == (before["level_metrics"].scheme == k).sum()
    assert len(agreement) == len(before["agreement"]) and built.n_flags == len(before["qc_flags"])


def test_expert_values_without_ai_values_beside_them_draw_no_figure_and_do_not_fail_the_report():
    """Expert fat ratios on three scans whose AI masks were empty: the figure was drawn from no pair at all
    and the report failed (ZeroDivisionError), exactly for the broken dataset whose flags it must show."""
    import types

    from nnsam2_assets.outputs.report import _agreement

    labels = pd.DataFrame(
        {
            "scan": ["a", "b", "c"],
            "volume_ml": [10.0, 11.0, 12.0],
            "expert_volume_ml": [10.5, 11.5, 12.5],
            "fat_ratio": [float("nan")] * 3,
            "expert_fat_ratio": [0.1, 0.2, 0.15],
        }
    )
    agreement = pd.DataFrame(
        {"scheme": ["2-class"], "label": ["right_lpm"], "measure": ["volume_ml"], "n": [3]}
    )
    page = _agreement(labels, agreement, types.SimpleNamespace(name="ds", n_classes=2))
    assert "Bland-Altman volume_ml" in page and "Bland-Altman fat_ratio" not in page
