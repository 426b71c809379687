"""Scale: one generated dataset of many small scans through every per-scan asset (ingest, propagation,
pseudo-labels, final masks from models trained once on a small pool, metrics), at N and at 10 N scans.

Rows: wall time per scan per step at both sizes (flat in N is the target), the DuckDB write of the large
dataset's rows (one transaction, as a rerun writes them), the time to add one scan to the large dataset, and
the peak RSS of the per-dataset chain in a fresh process (``bench.rss_child``) at both sizes.
"""

from __future__ import annotations

import time
from pathlib import Path

from bench._common import Workdir, all_assets, register, row, run_selection, step_durations
from bench.incremental import peak_rss_of_chain
from nnsam2_assets.core.layout import duckdb_path
from nnsam2_assets.defs.resources import RefinementSettings, build_resources
from nnsam2_assets.metrics.store import TABLES, dataset_tables, replace_dataset
from nnsam2_assets.pipeline import MODELS, PER_DATASET
from nnsam2_assets.runner import failure_message
from nnsam2_assets.testing.cohorts import hide_scan, restore_scan, write_tiny_dataset

PER_SCAN_ASSETS = [*PER_DATASET, "final_masks", "scan_metrics"]


def _run(wd: Workdir, res: dict, name: str | None, selection: list[str], assets: list):
    run = run_selection(wd.instance, res, name, selection, assets)
    if not run.result.success:
        raise RuntimeError(f"scale run of {name or 'the models'} failed: {failure_message(run.result)}")
    return run


def _steps(wd: Workdir, res: dict, name: str, assets: list) -> tuple[dict[str, float], float]:
    """Seconds per step of every per-scan asset of ``name``, and the wall time of both runs."""
    chain = _run(wd, res, name, PER_DATASET, assets)
    outputs = _run(wd, res, name, ["final_masks", "scan_metrics"], assets)
    return step_durations(chain.result) | step_durations(outputs.result), chain.seconds + outputs.seconds


def bench_scale(base: Path, quick: bool) -> list[dict]:
    small, large = (1, 2) if quick else (20, 200)
    assets = all_assets()
    wd = Workdir(base, "scale")
    try:
        # models trained once on a small pool: this bench times the per-scan work, not the models' accuracy
        write_tiny_dataset(wd.data, "pool", 2, seed=70)
        res = build_resources(
            wd.data, wd.storage(), RefinementSettings(num_epochs=1, iterations_per_epoch=1 if quick else 10)
        )
        register(wd.instance, ["pool"])
        _run(wd, res, "pool", PER_DATASET, assets)
        _run(wd, res, None, MODELS, assets)

        per_scan: dict[int, dict[str, float]] = {}
        wall: dict[int, float] = {}
        for n in (small, large):
            name = f"scale{n}"
            write_tiny_dataset(wd.data, name, n, seed=71)
            register(wd.instance, [name])
            steps, wall[n] = _steps(wd, res, name, assets)
            per_scan[n] = {step: steps[step] / n for step in PER_SCAN_ASSETS}

        name = f"scale{large}"
        db = duckdb_path(wd.storage())
        tables = dataset_tables(db, TABLES, name)
        tables = {t: df for t, df in tables.items() if len(df)}
        t0 = time.perf_counter()
        replace_dataset(db, name, tables)
        write_s = time.perf_counter() - t0
        n_rows = sum(len(df) for df in tables.values())

        # one more scan: the large dataset without its last scan is brought up to date, then the scan returns
        last, aside = f"subj{large - 1:02d}", wd.path / "aside"
        hide_scan(wd.data / name, last, aside)
        _steps(wd, res, name, assets)
        restore_scan(wd.data / name, last, aside)
        t0 = time.perf_counter()
        add_one_steps, _ = _steps(wd, res, name, assets)
        add_one_s = time.perf_counter() - t0
    finally:
        wd.close()

    total = {n: sum(per_scan[n].values()) for n in (small, large)}
    rows = [
        row(
            f"scale: per-scan step time, {large} / {small} scans",
            round(total[large] / total[small], 3),
            "<= 1.2" if not quick else "(smoke)",
            total[large] / total[small] <= 1.2 if not quick else None,
            f"{total[large]:.2f} vs {total[small]:.2f} s of step time per scan ("
            + ", ".join(f"{s} {per_scan[large][s]:.3f}" for s in PER_SCAN_ASSETS)
            + f" s/scan at {large}); wall {wall[large]:.0f} s for {large} scans, 64x64 in-plane",
        ),
        row(
            f"scale: DuckDB write of {large} scans' rows",
            round(write_s, 3),
            "(s)",
            None,
            f"{n_rows} rows in {len(tables)} tables replaced in one transaction ({n_rows / write_s:,.0f} rows/s)",
        ),
        row(
            f"scale: add 1 scan to {large - 1}",
            round(add_one_s, 3),
            "(s)",
            None,
            "chain + final masks + metrics ("
            + ", ".join(
                f"{step} {sec:.1f}" for step, sec in sorted(add_one_steps.items(), key=lambda kv: -kv[1])
            )
            + f" s); a full run of {large} scans took {wall[large]:.0f} s",
        ),
    ]
    # two fresh processes of the chain (full runs only: --quick's rss section runs the same code on 2 and 4 scans)
    if not quick:
        rss = peak_rss_of_chain(base / "scale-rss", (small, large), seed=72, grid=None)
        per_scan_kb = (rss.added_mb[large] - rss.added_mb[small]) / (large - small) * 1024
        rows.append(
            row(
                f"scale: peak RSS of the process, {large} / {small} scans",
                round(rss.whole_ratio, 3),
                "<= 1.2",
                rss.whole_ratio <= 1.2,
                f"{rss.detail}; the run's own growth is {per_scan_kb:.0f} kB per extra scan",
            )
        )
    return rows
