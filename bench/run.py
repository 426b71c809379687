"""nnsam2 performance table: ONE command, ONE table, every row measured side by side in the same run.

Usage: ``.venv/bin/python bench/run.py [--quick] [--json PATH] [--only ROW ...]``

Rows (ratio first, the absolute numbers beside it):
  model_loads      SAM2 model builds for N targets (one propagator, random weights, tiny frames) and nnU-Net
                   predictor loads while final_masks handles N new scans (lib/nnunet PREDICTOR_LOADS). Target 1.
  sam2_fps         SAM2Propagator frames/s vs bare ``propagate_in_video`` on the same frames (bench/sam2_bench).
  dagster_demo     the demo cohort (``nnsam2 demo``'s data; all 12 assets, nnU-Net at a small iteration budget)
                   through Dagster's in-process executor vs the same lib calls without Dagster
                   (bench/_common.direct_cohort). <= 1.10.
  dagster_inproc   the per-dataset chain (scans -> pseudo_labels) on tiny scans, the same comparison: the
                   worst case, where Dagster's fixed cost per step is largest relative to the work (info).
  dagster_multi    the same chain on the multiprocess executor (``execute_job`` of a reconstructable job):
                   every step is a fresh interpreter that re-imports dagster, SimpleITK, torch/nnunetv2, ...
  new_scan@N       a dataset with N processed scans gets one more; time of the chain's rematerialization,
                   ratio vs N=1 (<= 1.2), scans recomputed (asset metadata n_recomputed), full run for scale.
  peak_rss         peak RSS of a partition run (fresh subprocess) with many vs 2 scans. <= 1.2.
  stage:*          per-step wall time of a demo pipeline run (Dagster STEP_SUCCESS durations).
  propagation_tum  registration propagation on the real MyoSegmenTUM pair (bench/propagation_bench).

Synthetic phantom cohorts (64x64 in-plane) of controlled size; ``--quick`` scales everything down (smoke run).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import dagster as dg  # noqa: E402

from bench._common import (  # noqa: E402
    MEDIUM,
    PER_DATASET,
    direct_chain,
    hide_scan,
    register,
    resources,
    restore_scan,
    run_selection,
    step_durations,
    write_tiny_dataset,
)

OUTPUTS = ["final_masks", "scan_metrics", "agreement"]
SAM2_FULL = False
MODELS = ["nnunet_stage1", "nnunet_stage2", "nnunet_stage3"]


def _row(name: str, ratio, target: str, ok, detail: str, **extra) -> dict:
    return {"row": name, "ratio": ratio, "target": target, "ok": ok, "detail": detail, **extra}


class Workdir:
    """A scratch folder with its own Dagster instance (sqlite) for one bench section."""

    def __init__(self, base: Path, name: str):
        self.path = base / name
        self.data = self.path / "data"
        (self.path / "home").mkdir(parents=True, exist_ok=True)
        self._ctx = dg.instance_for_test(temp_dir=str(self.path / "home"))
        self.instance = self._ctx.__enter__()

    def storage(self, tag: str = "storage") -> Path:
        return self.path / tag

    def close(self) -> None:
        self._ctx.__exit__(None, None, None)


# ---------------------------------------------------------------------------------------------- sections
def bench_sam2(quick: bool, full_size: bool = False) -> list[dict]:
    """sam2_bench's small setting (image_size 256) unless ``--sam2-full`` (image_size 512, 256x256 slices:
    over 8 minutes on a loaded 2-core CPU, which would break the 20-minute budget of the full run)."""
    from bench.sam2_bench import run_sam2_bench

    reps = None if full_size else (2 if quick else 5)
    rows = {(r["bench"], r.get("impl")): r for r in run_sam2_bench(not full_size, reps)}
    prop, bare = rows[("sam2_fps", "propagator")], rows[("sam2_fps", "bare")]
    ratio, builds = rows[("sam2_fps_ratio", None)], rows[("sam2_model_builds", None)]
    return [
        _row(
            f"model_loads: SAM2 builds / {builds['targets']} targets",
            builds["builds"],
            "1",
            builds["builds"] == 1,
            f"{builds['builds']} build(s) for {builds['targets']} targets (MODEL_BUILDS counter)",
        ),
        _row(
            "sam2_fps: propagator / bare sam2",
            ratio["ratio"],
            ">= 0.9",
            ratio["ok"],
            f"{prop['fps']:.2f} vs {bare['fps']:.2f} frames/s, {prop['frames']} frames, image_size "
            f"{prop['image_size']}, median of {prop['reps']}; best-of-reps ratio {ratio['ratio_best']:.3f}",
        ),
    ]


def bench_dagster_overhead(base: Path, quick: bool) -> list[dict]:
    n_scans, reps = (2, 1) if quick else (8, 3)
    wd = Workdir(base, "overhead")
    try:
        write_tiny_dataset(wd.data, "ovh", n_scans, seed=11)
        register(wd.instance, ["ovh"])
        from nnsam2_assets.definitions import all_assets

        assets = all_assets()
        times: dict[str, list[float]] = {"dagster": [], "direct": []}
        bodies: list[float] = []
        for rep in range(reps + 1):  # rep 0 warms both paths (imports, numba/ITK init), not recorded
            for impl in ("direct", "dagster") if rep % 2 else ("dagster", "direct"):
                storage = wd.storage(f"s-{impl}-{rep}")
                if impl == "dagster":
                    run = run_selection(wd.instance, resources(wd.data, storage), "ovh", PER_DATASET, assets)
                    assert run.result.success, "per-dataset chain failed"
                    seconds = run.seconds
                    if rep:
                        bodies.append(sum(step_durations(run.result).values()))
                else:
                    t0 = time.perf_counter()
                    direct_chain(wd.data, storage, "ovh")
                    seconds = time.perf_counter() - t0
                shutil.rmtree(storage)
                if rep:
                    times[impl].append(seconds)
        d, x = statistics.median(times["dagster"]), statistics.median(times["direct"])
        steps = len(PER_DATASET)
        rows = [
            _row(
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
        if quick:
            rows.append(
                _row(
                    "dagster_multi: multiprocess / direct",
                    None,
                    "(info)",
                    None,
                    "skipped in --quick (a fresh interpreter per step costs ~40 s here); run without --quick",
                )
            )
            return rows
        # multiprocess executor: one run, a fresh interpreter per step
        from bench._defs import DATA_ENV, STORAGE_ENV, per_dataset_job

        storage = wd.storage("s-multi")
        os.environ[DATA_ENV], os.environ[STORAGE_ENV] = str(wd.data), str(storage)
        t0 = time.perf_counter()
        with dg.execute_job(
            dg.reconstructable(per_dataset_job), instance=wd.instance, tags={"dagster/partition": "ovh"}
        ) as result:
            ok = result.success
            steps = step_durations(result)
        m = time.perf_counter() - t0
        assert ok, "multiprocess run failed"
        in_steps = sum(steps.values())
        rows.append(
            _row(
                "dagster_multi: multiprocess / direct",
                round(m / x, 3),
                "(info)",
                None,
                f"{m:.2f} s vs {x:.2f} s; step bodies {in_steps:.2f} s, so ~{(m - in_steps) / len(steps):.1f} s "
                f"per step is process spawn + re-importing dagster/SimpleITK/torch/nnunetv2 ({len(steps)} steps)",
            )
        )
        return rows
    finally:
        wd.close()


def bench_demo_overhead(base: Path, quick: bool) -> list[dict]:
    """The whole graph on the demo cohort through Dagster vs without it, nnU-Net at a small budget so both
    fit the bench's time (the full budget only adds the same training time to both sides)."""
    from bench._common import direct_cohort
    from nnsam2_assets.defs.resources import RefinementSettings
    from nnsam2_assets.lib.phantom import write_demo_cohort
    from nnsam2_assets.runner import materialize_cohort

    refinement = RefinementSettings(num_epochs=1, iterations_per_epoch=3 if quick else 20)
    wd = Workdir(base, "demo-overhead")
    try:
        if quick:
            names = ["tiny-dixon", "tiny-ct"]
            write_tiny_dataset(wd.data, names[0], 2, seed=5)
            write_tiny_dataset(wd.data, names[1], 2, seed=6, kind="ct")
        else:
            names = [p.name for p in write_demo_cohort(wd.data)]
        register(wd.instance, names)
        # warm-up, not timed: the first nnU-Net plan/train/predict in a process pays one-off imports and
        # initialisation (~5 s here), which would otherwise be charged to whichever path runs first
        warm = wd.path / "warm-data"
        write_tiny_dataset(warm, "warm", 2, seed=7)
        direct_cohort(
            warm, wd.storage("s-warm"), ["warm"], RefinementSettings(num_epochs=1, iterations_per_epoch=2)
        )
        # ABBA order cancels a linear drift (thermal, page cache); nnU-Net training time varies by a few
        # per cent between runs, as much as Dagster's own cost, so one pair is not enough
        order = ["dagster", "direct"] if quick else ["dagster", "direct", "direct", "dagster"]
        totals: dict[str, list[float]] = {"dagster": [], "direct": []}
        stages: dict[str, list[float]] = {"dagster": [], "direct": []}
        counts: dict[str, dict] = {}
        for i, impl in enumerate(order):
            storage = wd.storage(f"s-{impl}-{i}")
            t0 = time.perf_counter()
            if impl == "dagster":
                run = materialize_cohort(
                    wd.instance,
                    names,
                    resources=resources(wd.data, storage, refinement),
                    progress=lambda m: None,
                )
                assert not run.failed, f"demo through Dagster failed: {run.failed}"
                parts = run.timings
            else:
                parts = direct_cohort(wd.data, storage, names, refinement)
            totals[impl].append(time.perf_counter() - t0)
            stages[impl].append(parts["models"])
            counts.setdefault(impl, _row_counts(storage / "nnsam2.duckdb"))
            shutil.rmtree(storage)
        assert counts["dagster"] == counts["direct"], f"the two paths wrote different rows: {counts}"
    finally:
        wd.close()
    d, x = statistics.mean(totals["dagster"]), statistics.mean(totals["direct"])
    md, mx = statistics.mean(stages["dagster"]), statistics.mean(stages["direct"])
    return [
        _row(
            "dagster_demo: demo cohort materialize / direct",
            round(d / x, 3),
            "<= 1.10",
            d / x <= 1.10,
            f"{d:.1f} s vs {x:.1f} s, mean of {len(totals['direct'])} each in {'-'.join(o[:3] for o in order)} "
            f"order ({'2 tiny datasets' if quick else 'demo cohort, 2 x 4 scans'}, all 12 assets, nnU-Net "
            f"{refinement.num_epochs} x {refinement.iterations_per_epoch} it; the three stages {md:.1f} vs "
            f"{mx:.1f} s); same DuckDB row counts ({sum(counts['direct'].values())} rows); untimed warm-up first",
        )
    ]


def _row_counts(db: Path) -> dict[str, int]:
    from nnsam2_assets.lib.metrics_db import SCHEMA, query

    tables = query(db, f"SELECT table_name FROM information_schema.tables WHERE table_schema = '{SCHEMA}'")
    return {
        t: int(query(db, f"SELECT count(*) AS n FROM {SCHEMA}.{t}").n.iloc[0])
        for t in sorted(tables.table_name)
    }


def bench_new_scan(base: Path, quick: bool) -> list[dict]:
    from nnsam2_assets.definitions import all_assets
    from nnsam2_assets.defs.common import latest_metadata

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
            res = resources(wd.data, wd.storage())
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
                    for a in ("scans", "frame_stacks", "propagated_masks")
                }
                hide_scan(folder, new_id, aside)  # forget_others drops its keys: the next add recomputes
                assert run_selection(wd.instance, res, name, PER_DATASET, assets).result.success
            t = statistics.median(times)
            first = first or t
            ok = all(v == 1 for v in recomputed.values()) and t / first <= 1.2
            rows.append(
                _row(
                    f"new_scan@N={n}: add 1 / N=1 case",
                    round(t / first, 3),
                    "<= 1.2",
                    ok,
                    f"{t:.2f} s (median of {reps}) to add 1 scan to {n}; recomputed "
                    + "/".join(f"{v}" for v in recomputed.values())
                    + f" (scans/frames/masks); full run of {n} scans {full.seconds:.2f} s",
                )
            )
    finally:
        wd.close()
    return rows


def bench_peak_rss(base: Path, quick: bool) -> list[dict]:
    big, small = (4, 2) if quick else (20, 2)
    out = {}
    for n in (small, big):
        data, storage = base / f"rss-data-{n}", base / f"rss-storage-{n}"
        write_tiny_dataset(data, f"rss{n}", n, seed=40 + n, grid=None if quick else MEDIUM)
        proc = subprocess.run(
            [sys.executable, str(ROOT / "bench" / "_child.py"), str(data), str(storage), f"rss{n}"],
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
    added = {n: out[n]["peak_rss_mb"] - out[n]["rss_after_imports_mb"] for n in (small, big)}
    r = added[big] / added[small]
    return [
        _row(
            f"peak_rss: {big} scans / {small} scans",
            round(r, 3),
            "<= 1.2",
            r <= 1.2,
            f"run peak above the post-import baseline {added[big]:.0f} vs {added[small]:.0f} MB; whole process "
            f"{out[big]['peak_rss_mb']:.0f} vs {out[small]['peak_rss_mb']:.0f} MB (fresh process each, "
            f"high-water mark reset after imports and a warm-up run: {out[small]['peak_was_reset']}); "
            f"{'64x64' if quick else '160x160'} scans ({input_mb:.0f} MB of NIfTI for {big}); runs "
            f"{out[big]['seconds']:.1f} s vs {out[small]['seconds']:.1f} s",
        )
    ]


def bench_demo(base: Path, quick: bool) -> list[dict]:
    """A small two-dataset demo run: per-step wall times, and nnU-Net predictor loads for N new scans."""
    from nnsam2_assets.definitions import all_assets
    from nnsam2_assets.defs.resources import RefinementSettings
    from nnsam2_assets.lib.nnunet import predict as nn_predict
    from nnsam2_assets.runner import _failure

    n_scans, n_new = (2, 1) if quick else (5, 4)
    refinement = (
        RefinementSettings(num_epochs=1, iterations_per_epoch=10)
        if quick
        else RefinementSettings(num_epochs=2, iterations_per_epoch=25)
    )
    wd = Workdir(base, "demo")
    assets = all_assets()
    try:
        dixon = write_tiny_dataset(wd.data, "demo-dixon", n_scans + n_new, seed=0)
        write_tiny_dataset(wd.data, "demo-ct", n_scans, seed=1, kind="ct")
        aside = wd.path / "aside"
        new_ids = [f"subj{i:02d}" for i in range(n_scans, n_scans + n_new)]
        for s in new_ids:
            hide_scan(dixon, s, aside)
        names = ["demo-ct", "demo-dixon"]
        register(wd.instance, names)
        res = resources(wd.data, wd.storage(), refinement)
        steps: dict[str, float] = {}

        def add(run, suffix: str = "") -> None:
            assert run.result.success, f"demo run failed: {_failure(run.result)}"
            for k, v in step_durations(run.result).items():
                steps[k + suffix] = steps.get(k + suffix, 0.0) + v

        for n in names:
            add(run_selection(wd.instance, res, n, PER_DATASET, assets))
        loads0 = nn_predict.PREDICTOR_LOADS
        add(run_selection(wd.instance, res, None, MODELS, assets))
        model_loads = nn_predict.PREDICTOR_LOADS - loads0
        for n in names:
            add(run_selection(wd.instance, res, n, OUTPUTS, assets))
        # N new scans arrive: per-dataset chain, then final masks from the current models
        for s in new_ids:
            restore_scan(dixon, s, aside)
        chain = run_selection(wd.instance, res, "demo-dixon", PER_DATASET, assets)
        assert chain.result.success, f"new-scan chain failed: {_failure(chain.result)}"
        loads0 = nn_predict.PREDICTOR_LOADS
        out_run = run_selection(wd.instance, res, "demo-dixon", OUTPUTS, assets)
        assert out_run.result.success, f"new-scan outputs failed: {_failure(out_run.result)}"
        new_loads = nn_predict.PREDICTOR_LOADS - loads0
    finally:
        wd.close()
    per_stage = new_loads / 3
    rows = [
        _row(
            f"model_loads: nnU-Net predictor loads per stage / {n_new} new scans",
            round(per_stage, 3),
            "1",
            new_loads == 3,
            f"final_masks for {n_new} new scans: {new_loads} loads over 3 stages; training run "
            f"(predicts all {2 * n_scans} scans): {model_loads} loads over 3 stages",
        )
    ]
    total = sum(steps.values())
    labels = {
        "scans": "ingest",
        "frame_stacks": "frames",
        "propagated_masks": "propagation",
        "pseudo_labels": "pseudo-labels",
        "final_masks": "final masks",
        "scan_metrics": "metrics",
        "agreement": "agreement",
    }
    for step, sec in sorted(steps.items(), key=lambda kv: -kv[1]):
        rows.append(
            _row(
                f"stage: {labels.get(step, step)} ({step})",
                round(sec / total, 3),
                "(share)",
                None,
                f"{sec:.2f} s over both datasets ({2 * n_scans} scans; nnU-Net {refinement.num_epochs} ep x "
                f"{refinement.iterations_per_epoch} it)",
            )
        )
    rows.append(_row("stage: total", 1.0, "(share)", None, f"{total:.1f} s of step time"))
    return rows


def bench_propagation(quick: bool) -> list[dict]:
    from bench.propagation_bench import TUM, run_propagation_bench

    if not (TUM / "TUM01_water.nii.gz").exists():
        raise FileNotFoundError(f"{TUM}: real TUM pair missing (set NNSAM2_SHARED_DATA)")
    rows = []
    for r in run_propagation_bench(quick=quick):
        rows.append(
            _row(
                f"propagation_tum: {r['direction']} {r['seed']}",
                round(r["dice_2c"], 3),
                "(Dice 2c)",
                None,
                f"Dice 4c {r['dice_4c']:.3f}, top10% Dice 2c {r['top10_dice_2c']:.3f}, rho2 "
                f"{r['spearman_2c']:.2f}, {r['seconds_per_target']:.1f} s/target"
                + (" (quick: fast registration)" if quick else ""),
            )
        )
    return rows


SECTIONS: dict[str, Callable] = {
    "sam2": lambda base, quick: bench_sam2(quick, SAM2_FULL),
    "overhead": bench_dagster_overhead,
    "demo_overhead": bench_demo_overhead,
    "new_scan": bench_new_scan,
    "rss": bench_peak_rss,
    "demo": bench_demo,
    "propagation": lambda base, quick: bench_propagation(quick),
}


def format_table(rows: list[dict], header: str) -> str:
    def fmt(v) -> str:
        if v is None:
            return ""
        if isinstance(v, bool):
            return "OK" if v else "MISSED"
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    w = max(len(r["row"]) for r in rows)
    lines = [header, f"{'row':<{w}} | {'ratio':>7} | {'target':>8} | {'ok':>6} | absolute"]
    lines.append("-" * (w + 40))
    for r in rows:
        lines.append(
            f"{r['row']:<{w}} | {fmt(r['ratio']):>7} | {r['target']:>8} | {fmt(r['ok']):>6} | {r['detail']}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes: a smoke run of a few minutes")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    ap.add_argument("--only", nargs="*", choices=sorted(SECTIONS), default=None, help="run these sections")
    ap.add_argument("--sam2-full", action="store_true", help="SAM2 fps at image_size 512 (slow on CPU)")
    args = ap.parse_args(argv)
    global SAM2_FULL
    SAM2_FULL = args.sam2_full and not args.quick
    os.environ.setdefault("TQDM_DISABLE", "1")
    cmd = "bench/run.py" + (" --quick" if args.quick else "")
    header = (
        f"nnsam2 bench: `{cmd}` on {platform.node() or 'host'} ({os.cpu_count()} cores, "
        f"{platform.processor() or platform.machine()}, Python {platform.python_version()}, "
        f"load avg {os.getloadavg()[0]:.1f})"
    )
    rows, errors, started = [], {}, time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="nnsam2-bench-") as tmp:
        for name in args.only or list(SECTIONS):
            t0 = time.perf_counter()
            print(f"[bench] {name} ...", file=sys.stderr, flush=True)
            try:
                section_rows = SECTIONS[name](Path(tmp), args.quick)
            except Exception as exc:  # one failing section must not hide the others' numbers
                errors[name] = f"{type(exc).__name__}: {exc}"
                section_rows = [_row(f"{name}: ERROR", None, "", False, errors[name][:300])]
            print(f"[bench] {name} done in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
            rows += section_rows
    header += f"; total {time.perf_counter() - started:.0f} s"
    print(format_table(rows, header))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {"command": cmd, "header": header, "quick": args.quick, "rows": rows, "errors": errors}
        args.json.write_text(json.dumps(payload, indent=2, default=str))
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
