"""Propagation with 2 worker processes against 1, on the same 8 scans, side by side (ABBA order, twice): the
speed-up of the medians, and that the masks are the same bytes. Four runs per arm: a moment of other work on a
2-core machine costs the 2-worker arm its spare core, and with two runs per arm one full run gave 1.67 where the
section alone gave 1.84-1.96 just after."""

from __future__ import annotations

import shutil
import statistics
import time
from pathlib import Path

from bench._common import row
from nnsam2_assets.core.storage import sha256_file
from nnsam2_assets.propagation.settings import PropagationConfig
from nnsam2_assets.testing.cohorts import MEDIUM, write_tiny_dataset
from nnsam2_assets.testing.direct import STEPS, DirectRun


def _timed_propagation(data: Path, storage: Path, workers: int) -> tuple[float, dict[str, str]]:
    run = DirectRun(data, storage, ["workers"], propagation=PropagationConfig(workers=workers))
    for asset in ("scans", "reference_annotation"):
        STEPS[asset](run, "workers")
    layout = run.layout("workers")
    t0 = time.perf_counter()
    report = STEPS["propagated_masks"](run, "workers")
    seconds = time.perf_counter() - t0
    assert report.computed == len(report.summary) and report.workers == min(workers, report.computed)
    digests = {s: sha256_file(layout.masks(s)) for s in report.summary.scan}
    shutil.rmtree(storage)
    return seconds, digests


def bench_workers(base: Path, quick: bool) -> list[dict]:
    n_scans = 4 if quick else 8
    data = base / "workers-data"
    write_tiny_dataset(data, "workers", n_scans, seed=61, grid=None if quick else MEDIUM)
    times: dict[int, list[float]] = {1: [], 2: []}
    digests: list[dict[str, str]] = []
    for i, workers in enumerate((1, 2) if quick else (1, 2, 2, 1) * 2):
        seconds, masks = _timed_propagation(data, base / f"workers-storage-{i}", workers)
        times[workers].append(seconds)
        digests.append(masks)
    one, two = statistics.median(times[1]), statistics.median(times[2])
    same = all(masks == digests[0] for masks in digests)  # every run, not only the last of each count
    return [
        row(
            f"propagation_workers: 1 / 2 workers, {n_scans} scans",
            round(one / two, 3),
            ">= 1.7" if not quick else "(smoke)",
            (one / two >= 1.7 and same) if not quick else same,
            f"{one:.1f} s vs {two:.1f} s, median of {len(times[1])} each ({'64x64' if quick else '160x160'} scans, "
            f"registration backend, one ITK thread per worker); masks identical: {same}",
        )
    ]
