"""Incremental cost and memory: adding one scan to a dataset of N processed scans, and the peak memory of a
partition run with many scans against few (each in a fresh process, ``bench.rss_child``)."""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from bench._common import Workdir, all_assets, register, row, run_selection
from nnsam2_assets.defs.metadata import latest_metadata
from nnsam2_assets.defs.resources import build_resources
from nnsam2_assets.pipeline import PER_DATASET
from nnsam2_assets.testing.cohorts import MEDIUM, SMALL, hide_scan, restore_scan, write_tiny_dataset

ROOT = Path(__file__).resolve().parents[1]


def bench_new_scan(base: Path, quick: bool) -> list[dict]:
    sizes, reps = ((1, 3), 1) if quick else ((1, 5, 20), 5)
    assets = all_assets()
    rows, first = [], None
    wd = Workdir(base, "newscan")
    try:
        # one cohort for every N: dataset "new<N>" holds its first N scans plus the same new scan (the
        # cohort's last), so every N adds the identical scan to a prefix of the same cohort
        largest = max(sizes)
        source = write_tiny_dataset(wd.path / "cohort", "cohort", largest + 1, seed=20)
        new_id = f"subj{largest:02d}"
        for n in sizes:
            name = f"new{n}"
            folder = wd.data / name
            shutil.copytree(source, folder)
            for i in range(n, largest):
                hide_scan(folder, f"subj{i:02d}", wd.path / f"unused-{n}")
            aside = wd.path / f"aside-{n}"
            register(wd.instance, [name])
            res = build_resources(wd.data, wd.storage())
            hide_scan(folder, new_id, aside)
            full = run_selection(wd.instance, res, name, PER_DATASET, assets)  # N processed scans
            assert full.result.success
            times, recomputed = [], {}
            for _ in range(reps):
                restore_scan(folder, new_id, aside)
                run = run_selection(wd.instance, res, name, PER_DATASET, assets)
                assert run.result.success
                times.append(run.seconds)
                recomputed = {
                    a: latest_metadata(wd.instance, a, name).get("n_recomputed")
                    for a in ("scans", "propagated_masks")
                }
                hide_scan(folder, new_id, aside)  # forget_others drops its keys: the next add recomputes
                assert run_selection(wd.instance, res, name, PER_DATASET, assets).result.success
            t = statistics.median(times)
            first = first or t
            # --quick is a smoke run: only the invariant (one scan recomputed per asset) is judged, not time
            ok = all(v == 1 for v in recomputed.values()) and (quick or t / first <= 1.2)
            rows.append(
                row(
                    f"new_scan@N={n}: add 1 / N=1 case",
                    round(t / first, 3),
                    "<= 1.2",
                    ok,
                    f"{t:.2f} s (median of {reps}) to add 1 scan to {n}; recomputed "
                    + "/".join(f"{v}" for v in recomputed.values())
                    + f" (scans/masks); full run of {n} scans {full.seconds:.2f} s",
                )
            )
    finally:
        wd.close()
    return rows


@dataclass
class ChainRss:
    ratio: float  # the large run's memory above its post-import baseline / the small run's
    whole_ratio: float  # the large run's whole-process peak RSS / the small run's
    added_mb: dict[int, float]  # scans -> the run's peak above its post-import baseline
    detail: str


def peak_rss_of_chain(base: Path, sizes: tuple[int, int], seed: int, grid: dict | None) -> ChainRss:
    """Peak RSS of the per-dataset chain on a small and a large dataset, each in a fresh process."""
    small, big = sizes
    out = {}
    for n in sizes:
        data, storage = base / f"rss-data-{n}", base / f"rss-storage-{n}"
        write_tiny_dataset(data, f"rss{n}", n, seed=seed + n, grid=grid)
        proc = subprocess.run(
            [sys.executable, "-m", "bench.rss_child", str(data), str(storage), f"rss{n}"],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode or not lines:
            raise RuntimeError(f"rss child for {n} scans failed: {proc.stderr[-2000:]}")
        out[n] = json.loads(lines[-1])
    input_mb = sum(p.stat().st_size for p in (base / f"rss-data-{big}").rglob("*.nii.gz")) / 2**20
    # the run's own memory: peak during the run minus what the process held before it (imports of torch,
    # SAM2, nnU-Net, Dagster and a one-scan warm-up run), which would otherwise dilute the ratio towards 1
    added = {n: out[n]["peak_rss_mb"] - out[n]["rss_after_imports_mb"] for n in sizes}
    in_plane = "x".join(str(v) for v in (grid or SMALL)["shape_yx"])
    return ChainRss(
        added[big] / added[small],
        out[big]["peak_rss_mb"] / out[small]["peak_rss_mb"],
        added,
        f"run peak above the post-import baseline {added[big]:.0f} vs {added[small]:.0f} MB; whole process "
        f"{out[big]['peak_rss_mb']:.0f} vs {out[small]['peak_rss_mb']:.0f} MB (fresh process each, "
        f"high-water mark reset after imports and a warm-up run: {out[small]['peak_was_reset']}); "
        f"{in_plane} scans ({input_mb:.0f} MB of NIfTI for {big}); runs "
        f"{out[big]['seconds']:.1f} s vs {out[small]['seconds']:.1f} s",
    )


def bench_peak_rss(base: Path, quick: bool) -> list[dict]:
    big, small = (4, 2) if quick else (20, 2)
    rss = peak_rss_of_chain(base, (small, big), seed=40, grid=None if quick else MEDIUM)
    return [
        row(
            f"peak_rss: {big} scans / {small} scans",
            round(rss.ratio, 3),
            "<= 1.2" if not quick else "(smoke)",
            rss.ratio <= 1.2 if not quick else None,
            rss.detail,
        )
    ]
