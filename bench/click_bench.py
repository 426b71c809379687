"""Click prompts against the mask prompt on the real MyoSegmenTUM pair (weight-free registration backend).

    .venv/bin/python -m bench.click_bench [--json out.json]

Per direction (the annotated scan -> the other), the reference's middle slice is prompted either with its
expert mask or with clicks taken from that mask as a user would click (``testing.clicks``: per class the
deepest point and 4 more at least 3 mm inside, and 2 negatives 5-10 mm outside the muscles). Printed: the
slice Dice of the click-made mask against the expert on the clicked slice, the volume Dice (2- and 4-class)
and the per-side volume error of the propagated masks on the target, and the seconds of the annotation step.
Pipeline steps as the assets call them (``testing.direct``); reads ../shared/data, copies nothing.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import pandas as pd

from bench._common import cpu_model
from bench.refinement_bench import score
from nnsam2_assets.core.imaging import read_array
from nnsam2_assets.core.labels import mean_dice, to_class_space
from nnsam2_assets.ingest.annotation import read_annotation_meta
from nnsam2_assets.testing.direct import STEPS, DirectRun
from nnsam2_assets.testing.realdata import tum_click_dataset, tum_dataset

CASES = ("TUM01", "TUM02")


def run_prompt(root: Path, reference: str, prompt: str) -> dict:
    name = f"tum-{prompt}-{reference.lower()}"
    if prompt == "mask":
        tum_dataset(root / "data", name, reference)
    else:
        tum_click_dataset(root / "data", name, reference, "mrk")
    run = DirectRun(root / "data", root / "storage", [name])
    STEPS["scans"](run, name)
    t0 = time.perf_counter()
    STEPS["reference_annotation"](run, name)
    annotate_s = time.perf_counter() - t0
    STEPS["propagated_masks"](run, name)
    layout = run.layout(name)
    z = int(read_annotation_meta(layout)["seed_slice"])
    drawn = read_array(layout.annotation)[z]
    truth_ref = read_array(layout.scan_expert(reference))[z]
    target = next(c for c in CASES if c != reference)
    truth = read_array(layout.scan_expert(target))
    row = {
        "direction": f"{reference}->{target}",
        "prompt": prompt,
        "clicked_slice_dice_2c": mean_dice(to_class_space(drawn, 4, 2), to_class_space(truth_ref, 4, 2), 2),
        "clicked_slice_dice_4c": mean_dice(drawn, truth_ref, 4),
    }
    row.update({f"target_{k}": v for k, v in score(read_array(layout.masks(target)), truth, 4).items()})
    row["annotation_step_s"] = round(annotate_s, 2)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="nnsam2-clicks-"))
    rows = [run_prompt(root, ref, prompt) for ref in CASES for prompt in ("mask", "clicks")]
    table = pd.DataFrame(rows).set_index(["direction", "prompt"]).round(3)
    print(f"CPU: {cpu_model()}")
    print(table.T.to_string())
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
