"""Whole nnsam2 pipeline on the real MyoSegmenTUM Dixon pair, from ONE annotated slice.

    .venv/bin/python -m bench.refinement_bench [--seed middle|top] [--json out.json]

Weight-free registration backend, ``quick`` nnU-Net profile. Prints the 2-class (and 4-class) Dice against
the expert labels after propagation, on the kept pseudo-label slices, after each nnU-Net stage and for the
final masks, plus the wall time of each stage. Reads ../shared/data (never copies it into the project).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import dagster as dg
import numpy as np
import SimpleITK as sitk

from nnsam2_assets.core.imaging import read_array
from nnsam2_assets.core.labels import mean_dice, to_class_space
from nnsam2_assets.core.layout import DatasetLayout, model_pointer, stage_prediction
from nnsam2_assets.defs.resources import RefinementSettings, build_resources
from nnsam2_assets.runner import materialize_cohort
from nnsam2_assets.testing.realdata import TUM, tum_dataset


def _dice(pred: np.ndarray, truth: np.ndarray, k: int, slices=None) -> float:
    if slices is not None:
        pred, truth = pred[slices], truth[slices]
    return mean_dice(pred, truth, k)


def run_refinement_bench(
    seed: str = "middle", workdir: Path | None = None, epochs: int = 0, iterations: int = 0
) -> list[dict]:
    root = Path(workdir or tempfile.mkdtemp(prefix="nnsam2-tum-"))
    data, storage = root / "data", root / "storage"
    seed_z = (
        None if seed == "middle" else int(sitk.ReadImage(str(TUM / "TUM01_water.nii.gz")).GetSize()[2] - 1)
    )
    tum_dataset(data, "tum", reference="TUM01", seed_z=seed_z)
    resources = build_resources(data, storage)
    if epochs or iterations:  # 0 keeps the quick profile's budget
        resources["refinement"] = RefinementSettings(num_epochs=epochs, iterations_per_epoch=iterations)
    timings: dict[str, float] = {}
    (root / "dagster").mkdir(parents=True, exist_ok=True)
    with dg.instance_for_test(temp_dir=str(root / "dagster")) as instance:
        instance.add_dynamic_partitions("datasets", ["tum"])
        t0 = time.perf_counter()
        run = materialize_cohort(
            instance, ["tum"], resources=resources, progress=lambda m: print(m, flush=True)
        )
        total = time.perf_counter() - t0
        if run.failed:
            raise RuntimeError(f"pipeline failed: {run.failed}")
        timings.update({k: round(v, 1) for k, v in run.timings.items()})
        for record in instance.get_records_for_run(run.run_ids[1]).records if len(run.run_ids) > 1 else []:
            event = record.event_log_entry.dagster_event
            if event and event.is_step_success:
                timings[event.step_key] = round(event.event_specific_data.duration_ms / 1000, 1)
    layout = DatasetLayout(storage, "tum")
    selection = __import__("pandas").read_parquet(layout.pseudo_selection)
    rows = []
    for scan in ("TUM01", "TUM02"):
        truth4 = read_array(layout.scan_expert(scan))
        truth2 = to_class_space(truth4, 4, 2)
        prop4 = read_array(layout.masks(scan))
        kept = selection[(selection.scan == scan) & selection.kept].slice.to_numpy()
        row = {
            "scan": scan,
            "role": "reference" if scan == "TUM01" else "target",
            "seed": seed,
            "propagation_2c": _dice(to_class_space(prop4, 4, 2), truth2, 2),
            "propagation_4c": _dice(prop4, truth4, 4),
            "kept_slices": int(len(kept)),
            "pseudo_label_kept_2c": _dice(to_class_space(prop4, 4, 2), truth2, 2, kept)
            if len(kept)
            else np.nan,
        }
        for stage in ("stage1", "stage2", "stage3"):
            cur = json.loads(model_pointer(storage, stage).read_text())
            pred = read_array(stage_prediction(Path(cur["model_dir"]), "tum", scan))
            k = int(cur["n_classes"])
            row[f"{stage}_2c"] = _dice(to_class_space(pred, k, 2), truth2, 2)
            if k == 4:
                row[f"{stage}_4c"] = _dice(pred, truth4, 4)
        final = read_array(layout.final_mask_canonical(scan))
        k = 4 if final.max() > 2 else 2
        row["final_2c"] = _dice(to_class_space(final, k, 2), truth2, 2)
        if k == 4:
            row["final_4c"] = _dice(final, truth4, 4)
        rows.append(row)
    rows.append({"scan": "timings_s", "total": round(total, 1), **timings})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--seed", choices=["middle", "top"], default="middle")
    parser.add_argument("--json", default="")
    parser.add_argument("--epochs", type=int, default=0, help="override the quick profile's epochs")
    parser.add_argument("--iterations", type=int, default=0, help="override its iterations per epoch")
    args = parser.parse_args()
    rows = run_refinement_bench(args.seed, epochs=args.epochs, iterations=args.iterations)
    import pandas as pd

    scans = pd.DataFrame([r for r in rows if r["scan"] != "timings_s"]).set_index("scan")
    print("\n2-class / 4-class volume Dice vs expert labels (TUM01 annotated, one slice)")
    print(scans.round(3).T.to_string())
    print("\nwall time (s):", json.dumps(rows[-1]))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
