"""nnsam2 performance table: ONE command, ONE table, every row measured side by side in the same run.

Usage: ``.venv/bin/python -m bench.run [--quick] [--jobs N] [--json PATH] [--only SECTION ...]`` (from the
repository root)

Rows (ratio first, the absolute numbers beside it):
  model_loads      SAM2 model builds for N targets (one propagator, random weights, tiny frames) and nnU-Net
                   predictor loads while final_masks handles N new scans (``refinement.nnunet`` PREDICTOR_LOADS). Target 1.
  sam2_fps         SAM2Propagator frames/s vs bare ``propagate_in_video`` on the same frames (``bench.sam2_bench``).
  dagster_demo     the demo cohort (``nnsam2 demo``'s data; every asset, nnU-Net at a small iteration budget)
                   through Dagster's in-process executor vs the same domain calls without Dagster
                   (``nnsam2_assets.testing.direct``). <= 1.10.
  dagster_inproc   the per-dataset chain (scans -> pseudo_labels) on tiny scans, the same comparison: the
                   worst case, where Dagster's fixed cost per step is largest relative to the work (info).
  dagster_multi    the same chain on the multiprocess executor (``execute_job`` of a reconstructable job):
                   every step is a fresh interpreter that re-imports dagster, SimpleITK, torch/nnunetv2, ...
  new_scan@N       a dataset with N processed scans gets one more; time of the chain's rematerialization,
                   ratio vs N=1 (<= 1.2), scans recomputed (asset metadata n_recomputed), full run for scale.
  peak_rss         peak RSS of a partition run (fresh subprocess) with many vs 2 scans. <= 1.2.
  stage:*          per-step wall time of a demo pipeline run (Dagster STEP_SUCCESS durations).
  propagation_tum  registration propagation on the real MyoSegmenTUM pair (``bench.propagation_bench``).
  propagation_workers  a dataset's scans propagated by 2 worker processes vs 1 (``bench.workers``). >= 1.7.
  demo_wall        ``nnsam2 demo`` in a fresh home with one core kept busy (``bench.demo_wall``): wall time,
                   nnU-Net s/iteration, and the wall projected at 0.66 s/iteration. <= 600 s.
  nnunet_iteration  a quick-profile nnU-Net iteration on the TUM pair: one background augmentation worker
                   against none, and the share of forward, backward and optimiser (``bench.iteration``; info).
  scale:*          one dataset of 200 small scans against 20 (``bench.scale``): step time per scan (<= 1.2),
                   DuckDB write of its rows, adding one scan, peak RSS of the chain (<= 1.2).

Synthetic phantom cohorts (64x64 in-plane) of controlled size; ``--quick`` scales everything down (smoke run)
and runs the sections side by side, one process per core (``--jobs``): its numbers are not judged on time, and
a section sharing the machine with another is still the same code run end to end. A full run keeps one
section at a time, because its ratios are measured side by side inside a section on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import importlib
import json
import multiprocessing
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path

from bench._common import cpu_model, row


def bench_sam2(quick: bool, full_size: bool = False) -> list[dict]:
    """sam2_bench's small setting (image_size 256; 128 and one repetition in ``--quick``) unless
    ``--sam2-full`` (image_size 512, 256x256 slices: over 8 minutes on a loaded 2-core CPU, which would break
    the 20-minute budget of the full run)."""
    from bench.sam2_bench import run_sam2_bench

    reps = None if full_size else (1 if quick else 5)
    rows = {(r["bench"], r.get("impl")): r for r in run_sam2_bench(not full_size, reps, smoke=quick)}
    prop, bare = rows[("sam2_fps", "propagator")], rows[("sam2_fps", "bare")]
    ratio, builds = rows[("sam2_fps_ratio", None)], rows[("sam2_model_builds", None)]
    return [
        row(
            f"model_loads: SAM2 builds / {builds['targets']} targets",
            builds["builds"],
            "1",
            builds["builds"] == 1,
            f"{builds['builds']} build(s) for {builds['targets']} targets (MODEL_BUILDS counter)",
        ),
        row(
            "sam2_fps: propagator / bare sam2",
            ratio["ratio"],
            ">= 0.9",
            None if quick else ratio["ok"],  # --quick runs sections side by side: not judged on time
            f"{prop['fps']:.2f} vs {bare['fps']:.2f} frames/s, {prop['frames']} frames, image_size "
            f"{prop['image_size']}, median of {prop['reps']}; best-of-reps ratio {ratio['ratio_best']:.3f}",
        ),
    ]


def bench_propagation(quick: bool) -> list[dict]:
    from bench.propagation_bench import run_propagation_bench
    from nnsam2_assets.testing.realdata import TUM

    if not (TUM / "TUM01_water.nii.gz").exists():
        raise FileNotFoundError(f"{TUM}: real TUM pair missing (set NNSAM2_SHARED_DATA)")
    rows = []
    for r in run_propagation_bench(quick=quick):
        rows.append(
            row(
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


# section -> "module:function" called as function(base, quick), imported when the section runs (the sam2
# section also takes ``full_size``, the one option a section has beyond --quick): the sections
# import torch, SAM2 and nnU-Net between them, and a run of one section (or the fork server of a multiprocess
# run, which re-imports this module) should not pay for the others
SECTIONS: dict[str, str] = {
    "sam2": "bench.run:bench_sam2_section",
    "overhead": "bench.overhead:bench_dagster_overhead",
    "cli_overhead": "bench.overhead:bench_cli_overhead",
    "demo_overhead": "bench.overhead:bench_demo_overhead",
    "new_scan": "bench.incremental:bench_new_scan",
    "rss": "bench.incremental:bench_peak_rss",
    "demo": "bench.stages:bench_demo",
    "propagation": "bench.run:bench_propagation_section",
    "workers": "bench.workers:bench_workers",
    "scale": "bench.scale:bench_scale",
    "demo_wall": "bench.demo_wall:bench_demo_wall",
    "iteration": "bench.iteration:bench_iteration",
}


def bench_sam2_section(base: Path, quick: bool, full_size: bool = False) -> list[dict]:
    return bench_sam2(quick, full_size)


def bench_propagation_section(base: Path, quick: bool) -> list[dict]:
    return bench_propagation(quick)


def run_section(name: str, base: Path, quick: bool, sam2_full: bool = False) -> list[dict]:
    module, function = SECTIONS[name].split(":")
    options = {"full_size": sam2_full} if name == "sam2" else {}
    t0 = time.perf_counter()
    print(f"[bench] {name} ...", file=sys.stderr, flush=True)
    try:
        return getattr(importlib.import_module(module), function)(base, quick, **options)
    finally:
        print(f"[bench] {name} done in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)


def run_sections(
    names: list[str], base: Path, quick: bool, sam2_full: bool, jobs: int
) -> dict[str, list[dict] | Exception]:
    """Each section's rows, or the exception it raised: one failing section must not hide the others' numbers.

    With ``jobs`` > 1 the sections run in that many worker processes (``spawn``: nothing inherited from this
    one but the environment), each worker taking the next section when it finishes one, as a sequential run
    does in its one process; every section has its own scratch folder and Dagster instance."""
    if jobs <= 1:
        return {name: _outcome(partial(run_section, name, base, quick, sam2_full)) for name in names}
    # by reference to this module's importable name: ``python -m bench.run`` runs it as ``__main__``
    section = importlib.import_module("bench.run").run_section
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
        futures = {name: pool.submit(section, name, base, quick, sam2_full) for name in names}
        # a future raises the section's own error, or the death of its worker process
        return {name: _outcome(future.result) for name, future in futures.items()}


def _outcome(call: Callable[[], list[dict]]) -> list[dict] | Exception:
    try:
        return call()
    except Exception as exc:
        return exc


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
    ap.add_argument("--quick", action="store_true", help="small sizes: a smoke run, sections side by side")
    ap.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="sections run at once (default: one per core with --quick, else 1: a full run's ratios need an idle machine)",
    )
    ap.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    ap.add_argument("--only", nargs="*", choices=sorted(SECTIONS), default=None, help="run these sections")
    ap.add_argument("--sam2-full", action="store_true", help="SAM2 fps at image_size 512 (slow on CPU)")
    args = ap.parse_args(argv)
    sam2_full = args.sam2_full and not args.quick
    names = args.only or list(SECTIONS)
    jobs = args.jobs
    if jobs is None:
        jobs = (os.cpu_count() or 1) if args.quick else 1
    jobs = max(1, min(jobs, len(names)))
    os.environ.setdefault("TQDM_DISABLE", "1")  # before any section process starts: they inherit it
    cmd = " ".join(["python -m bench.run", *(argv if argv is not None else sys.argv[1:])])
    header = (
        f"nnsam2 bench: `{cmd}` on {platform.node() or 'host'} ({os.cpu_count()} cores, "
        f"{cpu_model()}, Python {platform.python_version()}, load avg {os.getloadavg()[0]:.1f}; "
        f"{jobs} section(s) at a time)"
    )
    rows, errors, started = [], {}, time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="nnsam2-bench-") as tmp:
        results = run_sections(names, Path(tmp), args.quick, sam2_full, jobs)
    for name in names:
        result = results[name]
        if isinstance(result, Exception):
            errors[name] = f"{type(result).__name__}: {result}"
            result = [row(f"{name}: ERROR", None, "", False, errors[name][:300])]
        rows += result
    header += f"; total {time.perf_counter() - started:.0f} s"
    print(format_table(rows, header))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {"command": cmd, "header": header, "quick": args.quick, "rows": rows, "errors": errors}
        args.json.write_text(json.dumps(payload, indent=2, default=str))
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
