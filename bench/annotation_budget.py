"""How many annotated slices for what accuracy: 1, 2 and 3 annotated slices of the reference on the real
MyoSegmenTUM pair, in both directions (the middle slice, then the top and then the bottom of the region).

    .venv/bin/python -m bench.annotation_budget [--final] [--json out.json]

Per direction and budget, on the target scan: 2- and 4-class volume Dice and the per-side volume error of
the propagated masks (weight-free registration backend, each target slice from the nearest annotated
level); with ``--final`` also of the final masks after the whole pipeline at the default profile (about
10 minutes per row on a 2-core machine), and which masks they are. The further annotated slices are exact
labels for every nnU-Net stage; the middle one stays held out for the replace-or-keep check.
Reads ../shared/data, copies nothing.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import pandas as pd
import SimpleITK as sitk

from bench._common import cpu_model
from bench.refinement_bench import CASES, run_refinement_bench, score
from nnsam2_assets.core.imaging import read_array
from nnsam2_assets.testing.direct import STEPS, DirectRun
from nnsam2_assets.testing.realdata import TUM, tum_dataset


def budgets(reference: str) -> dict[int, tuple[int, ...]]:
    """Annotated file slices per budget beyond the middle one: the region's ends, top first."""
    n = sitk.ReadImage(str(TUM / f"{reference}_water.nii.gz")).GetSize()[2]
    return {1: (), 2: (n - 1,), 3: (n - 1, 0)}


def propagation_row(root: Path, reference: str, extra: tuple[int, ...]) -> dict:
    name = f"tum-{reference.lower()}-{len(extra) + 1}"
    tum_dataset(root / "data", name, reference, extra_slices=extra)
    run = DirectRun(root / "data", root / "storage", [name])
    for step in ("scans", "reference_annotation", "propagated_masks"):
        STEPS[step](run, name)
    layout = run.layout(name)
    target = next(c for c in CASES if c != reference)
    return score(read_array(layout.masks(target)), read_array(layout.scan_expert(target)), 4)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--final", action="store_true", help="also run the whole pipeline per budget")
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="nnsam2-budget-"))
    rows = []
    for reference in CASES:
        target = next(c for c in CASES if c != reference)
        for n_slices, extra in budgets(reference).items():
            base = {"direction": f"{reference}->{target}", "annotated_slices": n_slices}
            rows.append({**base, "masks": "propagation", **propagation_row(root, reference, extra)})
            if args.final:
                finished = run_refinement_bench(
                    workdir=root / f"final-{reference}-{n_slices}", reference=reference, extra_slices=extra
                )
                final = next(r for r in finished if r["masks"] == "final")
                timing = next(r for r in finished if r["masks"] == "timings_s")
                keep = {k: v for k, v in final.items() if k not in ("direction", "seed", "masks")}
                rows.append({**base, "masks": "final", **keep, "pipeline_s": timing["total"]})
            if args.json:
                Path(args.json).write_text(json.dumps(rows, indent=2, default=float))
    table = pd.DataFrame(rows)
    print(f"CPU: {cpu_model()}")
    for direction, part in table.groupby("direction", sort=False):
        print(f"\n{direction}: volume Dice and signed volume error (%) vs the target's expert labels")
        part = part.drop(columns=["direction"]).set_index(["annotated_slices", "masks"])
        print(part.round(3).T.to_string())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
