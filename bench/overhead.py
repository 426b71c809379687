"""What Dagster adds: the per-dataset chain and the whole demo cohort through Dagster against the same domain
calls without it (``nnsam2_assets.testing.direct``), measured side by side in alternating order."""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import dagster as dg

from bench._common import Workdir, all_assets, register, row, row_counts, run_selection, step_durations
from nnsam2_assets.core.layout import duckdb_path
from nnsam2_assets.core.storage import sha256_file
from nnsam2_assets.defs.partitions import datasets_partitions
from nnsam2_assets.defs.resources import RefinementSettings, build_resources
from nnsam2_assets.demo.datasets import write_demo_cohort
from nnsam2_assets.executors import CHAIN_STEP_EXECUTOR
from nnsam2_assets.pipeline import PER_DATASET, PHASES
from nnsam2_assets.refinement.settings import RefinementConfig
from nnsam2_assets.runner import materialize_cohort
from nnsam2_assets.testing.cli_runs import cli_env, dataset_job_command, local_home
from nnsam2_assets.testing.cohorts import write_tiny_dataset
from nnsam2_assets.testing.direct import DirectRun, run_direct

ROOT = Path(__file__).resolve().parents[1]

# the multiprocess run's step processes rebuild the job from this module and read the roots from here
DATA_ENV, STORAGE_ENV = "NNSAM2_BENCH_DATA_ROOT", "NNSAM2_BENCH_STORAGE_ROOT"


# before: what the code location used until the forkserver executor (a fresh interpreter per step)
SPAWN_EXECUTOR = dg.multiprocess_executor.configured({"max_concurrent": 2})


def _per_dataset_job(executor: dg.ExecutorDefinition) -> dg.JobDefinition:
    """The per-dataset chain as a reconstructable job on a multiprocess executor (a process per step)."""
    job = dg.define_asset_job(
        "bench_per_dataset", selection=PER_DATASET, partitions_def=datasets_partitions, executor_def=executor
    )
    roots = build_resources(Path(os.environ[DATA_ENV]), Path(os.environ[STORAGE_ENV]))
    return dg.Definitions(assets=all_assets(), jobs=[job], resources=roots).resolve_job_def(
        "bench_per_dataset"
    )


def per_dataset_job_spawn() -> dg.JobDefinition:
    return _per_dataset_job(SPAWN_EXECUTOR)


def per_dataset_job_forkserver() -> dg.JobDefinition:
    # the engine the code location's dataset_job runs on (its fork server leaves torch and nnU-Net out)
    return _per_dataset_job(CHAIN_STEP_EXECUTOR)


MULTIPROCESS_JOBS = {"spawn": per_dataset_job_spawn, "forkserver": per_dataset_job_forkserver}


def bench_dagster_overhead(base: Path, quick: bool) -> list[dict]:
    n_scans, reps = (2, 1) if quick else (8, 3)
    wd = Workdir(base, "overhead")
    try:
        write_tiny_dataset(wd.data, "ovh", n_scans, seed=11)
        register(wd.instance, ["ovh"])
        assets = all_assets()
        times: dict[str, list[float]] = {"dagster": [], "direct": []}
        bodies: list[float] = []
        for rep in range(reps + 1):  # rep 0 warms both paths (imports, numba/ITK init), not recorded
            for impl in ("direct", "dagster") if rep % 2 else ("dagster", "direct"):
                storage = wd.storage(f"s-{impl}-{rep}")
                if impl == "dagster":
                    res = build_resources(wd.data, storage)
                    run = run_selection(wd.instance, res, "ovh", PER_DATASET, assets)
                    assert run.result.success, "per-dataset chain failed"
                    seconds = run.seconds
                    if rep:
                        bodies.append(sum(step_durations(run.result).values()))
                else:
                    t0 = time.perf_counter()
                    run_direct(DirectRun(wd.data, storage, ["ovh"]), phases=("datasets",))
                    seconds = time.perf_counter() - t0
                shutil.rmtree(storage)
                if rep:
                    times[impl].append(seconds)
        d, x = statistics.median(times["dagster"]), statistics.median(times["direct"])
        steps = len(PER_DATASET)
        rows = [
            row(
                "dagster_inproc: chain on tiny scans / direct",
                round(d / x, 3),
                "(info)",
                None,
                f"{d:.2f} s vs {x:.2f} s for {n_scans} scans (median of {reps}, alternating; best-of "
                f"{min(times['dagster']) / min(times['direct']):.3f}); step bodies {statistics.median(bodies):.2f} s "
                f"(incl. previews), so the framework costs {d - statistics.median(bodies):.2f} s outside steps; "
                f"{(d - x) / steps:.2f} s per step in all",
            )
        ]
        # multiprocess executors: one run each, a process per step; spawn (before) and forkserver (after),
        # measured side by side. --quick runs the forkserver one only (spawn costs ~40 s here).
        fixed = {}
        for method in ("forkserver",) if quick else ("spawn", "forkserver"):
            storage = wd.storage(f"s-{method}")
            os.environ[DATA_ENV], os.environ[STORAGE_ENV] = str(wd.data), str(storage)
            t0 = time.perf_counter()
            with dg.execute_job(
                dg.reconstructable(MULTIPROCESS_JOBS[method]),
                instance=wd.instance,
                tags={"dagster/partition": "ovh"},
            ) as result:
                ok = result.success
                steps = step_durations(result)
            m = time.perf_counter() - t0
            assert ok, f"multiprocess ({method}) run failed"
            fixed[method] = (m - x) / len(steps)
            rows.append(
                row(
                    f"dagster_multi: multiprocess ({method}) / direct",
                    round(m / x, 3),
                    "(info)",
                    None,
                    f"{m:.2f} s vs {x:.2f} s; step bodies {sum(steps.values()):.2f} s; fixed cost "
                    f"{fixed[method]:.2f} s per step ({len(steps)} steps)",
                )
            )
        rows.append(
            row(
                "step_fixed_cost_inproc: forkserver from a warm launcher, s per step",
                round(fixed["forkserver"], 3),
                "(info)",
                None,
                "(multiprocess wall - direct wall) / steps, the run launched from this warm process"
                + (f"; spawn {fixed['spawn']:.2f} s per step" if "spawn" in fixed else ""),
            )
        )
        return rows
    finally:
        wd.close()


def bench_demo_overhead(base: Path, quick: bool) -> list[dict]:
    """The whole graph on the demo cohort through Dagster vs without it, nnU-Net at a small budget so both
    fit the bench's time (the full budget only adds the same training time to both sides)."""
    refinement = RefinementSettings(num_epochs=1, iterations_per_epoch=2 if quick else 20)
    wd = Workdir(base, "demo-overhead")
    try:
        # --quick is a smoke run of this code: one tiny dataset, its per-dataset phase only (the models are the
        # demo section's), no warm-up, one pass each; the ratio is not a measurement
        phases = ("datasets",) if quick else tuple(phase.name for phase in PHASES)
        if quick:
            names = ["tiny-dixon"]
            write_tiny_dataset(wd.data, names[0], 2, seed=5)
        else:
            names = [p.name for p in write_demo_cohort(wd.data)]
        register(wd.instance, names)
        if not quick:
            # warm-up, not timed: the first nnU-Net plan/train/predict in a process pays one-off imports and
            # initialisation (~5 s here), which would otherwise be charged to whichever path runs first
            warm = wd.path / "warm-data"
            write_tiny_dataset(warm, "warm", 2, seed=7)
            run_direct(
                DirectRun(
                    warm,
                    wd.storage("s-warm"),
                    ["warm"],
                    RefinementConfig(num_epochs=1, iterations_per_epoch=2),
                )
            )
        # ABBA order cancels a linear drift (thermal, page cache); nnU-Net training time varies by a few
        # per cent between runs, as much as Dagster's own cost, so one pair is not enough
        order = ["dagster", "direct"] if quick else ["dagster", "direct", "direct", "dagster"]
        totals: dict[str, list[float]] = {"dagster": [], "direct": []}
        stages: dict[str, list[float]] = {"dagster": [], "direct": []}
        counts: dict[str, dict] = {}
        masks: dict[str, dict[str, str]] = {}
        for i, impl in enumerate(order):
            storage = wd.storage(f"s-{impl}-{i}")
            t0 = time.perf_counter()
            if impl == "dagster":
                run = materialize_cohort(
                    wd.instance,
                    names,
                    resources=build_resources(wd.data, storage, refinement),
                    stages=phases,
                    progress=lambda m: None,
                )
                assert not run.failed, f"demo through Dagster failed: {run.failed}"
                parts = run.timings
            else:
                parts = run_direct(DirectRun(wd.data, storage, names, refinement.config()), phases=phases)
            totals[impl].append(time.perf_counter() - t0)
            stages[impl].append(parts.get("models", 0.0))
            counts.setdefault(impl, row_counts(duckdb_path(storage)))
            masks.setdefault(impl, _propagated_masks(storage))
            shutil.rmtree(storage)
        assert counts["dagster"] == counts["direct"], f"the two paths wrote different rows: {counts}"
        # the per-dataset phase writes no rows (--quick runs only that): its masks are what the paths share
        assert masks["dagster"] == masks["direct"] and masks["direct"], "the two paths propagated differently"
    finally:
        wd.close()
    d, x = statistics.mean(totals["dagster"]), statistics.mean(totals["direct"])
    md, mx = statistics.mean(stages["dagster"]), statistics.mean(stages["direct"])
    return [
        row(
            "dagster_demo: demo cohort materialize / direct",
            round(d / x, 3),
            "<= 1.10" if not quick else "(smoke)",
            d / x <= 1.10 if not quick else None,
            f"{d:.1f} s vs {x:.1f} s, mean of {len(totals['direct'])} each in {'-'.join(o[:3] for o in order)} "
            f"order ("
            + (
                "1 tiny dataset, per-dataset phase"
                if quick
                else f"demo cohort, 2 x 4 scans, all {len(all_assets())} assets, nnU-Net {refinement.num_epochs} x "
                f"{refinement.iterations_per_epoch} it; the three stages {md:.1f} vs {mx:.1f} s"
            )
            + f"); same DuckDB row counts ({sum(counts['direct'].values())} rows) and the same "
            f"{len(masks['direct'])} propagated masks" + ("" if quick else "; untimed warm-up first"),
        )
    ]


def _propagated_masks(storage: Path) -> dict[str, str]:
    """Digest of every propagated mask under a storage root, by its path there."""
    return {
        str(path.relative_to(storage)): sha256_file(path)
        for path in sorted(storage.glob("datasets/*/propagated_masks/*.nii.gz"))
    }


CLI_DATASET = "cli"


def _timed(cmd: list[str], env: dict[str, str]) -> tuple[float, float, int, str]:
    """Seconds until the command returns and until its output closes (a child that outlives it, such as the
    run's fork server, holds the output open), its exit code and stderr."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    chunks: list[str] = []
    reader = threading.Thread(target=lambda: chunks.extend(proc.stderr), daemon=True)
    reader.start()
    code = proc.wait()
    returned = time.perf_counter() - t0
    reader.join()
    return returned, time.perf_counter() - t0, code, "".join(chunks)


_LAUNCH, _STARTED, _START = "STEP_WORKER_STARTING", "STEP_WORKER_STARTED", "STEP_START"


def _cli_timeline(home: Path) -> dict[str, float]:
    """From the latest run's events: how long the first step waited for the fork server (its launch to its
    worker starting; the server was started while the code loaded, ``executors.start_step_server_early``) and
    the median launch-to-start of the other steps (forked from the running server)."""
    with dg.DagsterInstance.from_config(str(home)) as instance:
        run = instance.get_runs(limit=1)[0]
        times: dict[str, dict[str, float]] = {}
        for record in instance.all_logs(run.run_id):
            event = record.dagster_event
            if event is not None and event.step_key and event.event_type_value in (_LAUNCH, _STARTED, _START):
                times.setdefault(event.step_key, {})[event.event_type_value] = record.timestamp
    ordered = sorted(times.values(), key=lambda t: t[_LAUNCH])
    first, rest = ordered[0], ordered[1:]
    return {
        "server_start": first[_STARTED] - first[_LAUNCH],
        "step_start": statistics.median(t[_START] - t[_LAUNCH] for t in rest) if rest else float("nan"),
    }


def bench_cli_overhead(base: Path, quick: bool) -> list[dict]:
    """The issue's measure of a step's fixed cost: ``dagster job execute -j dataset_job`` on a tiny dataset as a
    fresh process, against the same domain calls in a fresh process without Dagster, (CLI - direct) / steps.
    Both pay their interpreter's start and imports; the CLI also starts the run's fork server, on the other
    core while it loads the code location (``executors.start_step_server_early``)."""
    n_scans, order = (2, ["cli", "direct"]) if quick else (2, ["cli", "direct", "direct", "cli"])
    path = base / "cli-overhead"
    data, home = path / "data", path / "dagster_home"
    write_tiny_dataset(data, CLI_DATASET, n_scans, seed=11)
    local_home(home, [CLI_DATASET])
    walls: dict[str, list[float]] = {"cli": [], "direct": []}
    timelines, closed_walls = [], []
    for i, impl in enumerate(order):
        env = cli_env(home, data, path / f"storage-{impl}-{i}", path)
        if impl == "cli":
            cmd = dataset_job_command(CLI_DATASET)
        else:
            cmd = [sys.executable, "-m", "bench.direct_chain", CLI_DATASET]
        returned, closed, code, stderr = _timed(cmd, env)
        walls[impl].append(returned)
        if code:
            raise RuntimeError(f"{impl} chain failed ({code}): {stderr[-2000:]}")
        if impl == "cli":
            timelines.append(_cli_timeline(home))
            closed_walls.append(closed)
    cli, direct = statistics.median(walls["cli"]), statistics.median(walls["direct"])
    steps = len(PER_DATASET)
    per_step = (cli - direct) / steps
    server = statistics.median(t["server_start"] for t in timelines)
    step_start = statistics.median(t["step_start"] for t in timelines)
    return [
        row(
            "step_fixed_cost: dagster job execute vs direct, fresh processes, s per step",
            round(per_step, 3),
            "<= 1 s",
            None if quick else per_step <= 1.0,
            f"({cli:.1f} s - {direct:.1f} s) / {steps} steps, median of {len(walls['cli'])} each in "
            f"{'-'.join(o[:3] for o in order)} order, {n_scans} tiny scans; CLI / direct {cli / direct:.2f} "
            f"(info); of it the first step waits {server:.1f} s for the run's fork server (started while the "
            f"code loaded), and a step forked from it takes "
            f"{step_start:.2f} s from launch to start (median of the other steps). Walls end when the command "
            f"returns, as `time` measures; the fork server finishes its own exit after that, in the background "
            f"(waiting for it too: {(statistics.median(closed_walls) - direct) / steps:.2f} s per step)",
        )
    ]
