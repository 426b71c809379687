"""Smoke test: ``python -m bench.run --quick`` runs end to end, prints its table and writes its JSON (numbers are
not asserted: the machine running CI is shared)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_quick_runs_and_reports(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        # every section, at --quick sizes (tiny phantoms, a few nnU-Net iterations)
        [sys.executable, "-m", "bench.run", "--quick", "--json", str(out)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # the command as given (a partial run's --only had been left out), and the CPU with its family and model
    assert f"nnsam2 bench: `python -m bench.run --quick --json {out}`" in proc.stdout
    assert "cores" in proc.stdout and "family" in proc.stdout
    payload = json.loads(out.read_text())
    assert payload["quick"] and not payload["errors"]
    names = " ".join(r["row"] for r in payload["rows"])
    for row in (
        "model_loads",
        "sam2_fps",
        "dagster_inproc",
        "dagster_demo",
        "stage: total",
        "new_scan",
        "peak_rss",
        "propagation_tum",
        "propagation_workers",
        "step_fixed_cost: dagster job execute",
        "step_fixed_cost_inproc",
        "scale: per-scan step time",
        "scale: DuckDB write",
        "scale: add 1 scan",
        "demo_wall: nnsam2 demo",
        "demo_wall: projected",
        "nnunet_iteration: one background augmentation worker",
        "nnunet_iteration: forward, backward",
    ):
        assert row in names, f"row {row} missing from the table"
        assert row in proc.stdout


def test_rescoring_takes_the_annotated_scan_from_the_run(tmp_path):
    """``--rescore`` scored TUM02 as the target whatever the run had annotated (``--direction`` defaults to
    both, whose first is TUM01), so a TUM02 run was scored on its own reference under the other direction's
    name; with ``--cohorts demo`` it failed on an empty tuple."""
    storage = tmp_path / "storage"
    meta = storage / "datasets" / "tum" / "reference_annotation" / "annotation.json"
    meta.parent.mkdir(parents=True)
    meta.write_text(json.dumps({"reference": "TUM02", "seed_slice": 14}))

    def bench(*args: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "bench.refinement_bench", "--rescore", str(storage), *args]
        return subprocess.run(command, capture_output=True, text=True, cwd=ROOT)

    demo = bench("--cohorts", "demo")
    assert demo.returncode == 2 and "not the demo cohort" in demo.stderr
    other = bench("--direction", "TUM01")
    assert other.returncode == 2 and f"{storage} annotated TUM02, not TUM01" in other.stderr
