"""Where the pipeline's time goes (per-step share of a small two-dataset run), and how often nnU-Net
predictors load when new scans get final masks."""

from __future__ import annotations

from pathlib import Path

from bench._common import Workdir, all_assets, register, row, run_selection, step_durations
from nnsam2_assets.defs.resources import RefinementSettings, build_resources
from nnsam2_assets.pipeline import MODELS, OUTPUTS, PER_DATASET
from nnsam2_assets.refinement.nnunet import predict as nn_predict
from nnsam2_assets.runner import failure_message
from nnsam2_assets.testing.cohorts import hide_scan, restore_scan, write_tiny_dataset


def bench_demo(base: Path, quick: bool) -> list[dict]:
    """A small two-dataset demo run: per-step wall times, and nnU-Net predictor loads for N new scans."""
    n_scans, n_new = (2, 1) if quick else (5, 4)
    refinement = (
        RefinementSettings(num_epochs=1, iterations_per_epoch=2)
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
        res = build_resources(wd.data, wd.storage(), refinement)
        steps: dict[str, float] = {}

        def add(run, suffix: str = "") -> None:
            assert run.result.success, f"demo run failed: {failure_message(run.result)}"
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
        assert chain.result.success, f"new-scan chain failed: {failure_message(chain.result)}"
        loads0 = nn_predict.PREDICTOR_LOADS
        out_run = run_selection(wd.instance, res, "demo-dixon", OUTPUTS, assets)
        assert out_run.result.success, f"new-scan outputs failed: {failure_message(out_run.result)}"
        new_loads = nn_predict.PREDICTOR_LOADS - loads0
    finally:
        wd.close()
    per_stage = new_loads / 3
    rows = [
        row(
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
        "propagated_masks": "propagation",
        "pseudo_labels": "pseudo-labels",
        "final_masks": "final masks",
        "scan_metrics": "metrics",
        "agreement": "agreement",
    }
    for step, sec in sorted(steps.items(), key=lambda kv: -kv[1]):
        rows.append(
            row(
                f"stage: {labels.get(step, step)} ({step})",
                round(sec / total, 3),
                "(share)",
                None,
                f"{sec:.2f} s over both datasets ({2 * n_scans} scans; nnU-Net {refinement.num_epochs} ep x "
                f"{refinement.iterations_per_epoch} it)",
            )
        )
    rows.append(row("stage: total", 1.0, "(share)", None, f"{total:.1f} s of step time"))
    return rows
