"""Where a quick-profile nnU-Net iteration goes, and whether a background augmentation worker pays.

The quick profile trains on the TUM pair (water images in the muscle box the stages use, expert labels merged
to the two sides; timing only, no accuracy claim) for one epoch of a few iterations, with augmentation in the training process (the CPU default,
``data_workers`` 0) and in one background worker (``data_workers`` 1), alternating. nnU-Net's ``train_step``
(forward, backward and the optimiser step) is timed inside each iteration; the rest of an iteration is loading
and augmenting the batch. Rows: seconds per iteration with one worker against none, and the train step's share.
"""

from __future__ import annotations

import statistics
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from bench._common import row
from nnsam2_assets.core.labels import merge_sides
from nnsam2_assets.refinement.nnunet._common import get_profile
from nnsam2_assets.refinement.nnunet.raw import TrainingCase
from nnsam2_assets.refinement.nnunet.train import train_model
from nnsam2_assets.refinement.roi import roi_from_mask
from nnsam2_assets.testing.realdata import tum_canonical

QUICK = get_profile("quick")


@contextmanager
def _timed_train_steps(seconds: list[float]):
    """Collect the duration of every ``train_step`` nnU-Net's trainer runs inside the block."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    original = nnUNetTrainer.train_step

    def timed(self, batch: dict) -> dict:
        t0 = time.perf_counter()
        out = original(self, batch)
        seconds.append(time.perf_counter() - t0)
        return out

    nnUNetTrainer.train_step = timed
    try:
        yield
    finally:
        nnUNetTrainer.train_step = original


def _tum_cases(folder: Path) -> list[TrainingCase]:
    folder.mkdir(parents=True, exist_ok=True)
    cases = []
    for case in ("TUM01", "TUM02"):
        image, labels = tum_canonical(case)
        label_img = sitk.GetImageFromArray(merge_sides(labels).astype(np.uint8))
        label_img.CopyInformation(image)
        roi = roi_from_mask(label_img, QUICK.roi_margin_mm)  # the muscle box the stages train in
        paths = folder / f"{case}_0000.nii.gz", folder / f"{case}.nii.gz"
        sitk.WriteImage(roi.crop(image), str(paths[0]))
        sitk.WriteImage(roi.crop(label_img), str(paths[1]))
        cases.append(TrainingCase(case, *paths))
    return cases


def bench_iteration(base: Path, quick: bool) -> list[dict]:
    iterations, order = (4, [0, 1]) if quick else (60, [0, 1, 1, 0])
    path = base / "iteration"
    cases = _tum_cases(path / "cases")
    per_iteration: dict[int, list[float]] = {0: [], 1: []}
    step_share: list[float] = []
    for i, workers in enumerate(order):
        profile = QUICK.replace(num_epochs=1, iterations_per_epoch=iterations, data_workers=workers)
        steps: list[float] = []
        with _timed_train_steps(steps):
            info = train_model(
                cases, ["right_lpm", "left_lpm"], False, path / f"work-{i}", path / f"model-{i}", profile, 960
            )
        per_iteration[workers].append(info.seconds_per_iteration)
        if workers == 0:
            step_share.append(statistics.fmean(steps) / info.seconds_per_iteration)
    none, one = statistics.median(per_iteration[0]), statistics.median(per_iteration[1])
    share = statistics.median(step_share)
    detail = f"{iterations} iterations per run, median of {len(per_iteration[0])} runs each, alternating"
    return [
        row(
            "nnunet_iteration: one background augmentation worker / none, s per iteration",
            round(one / none, 3),
            "(info)",
            None,
            f"{one:.3f} vs {none:.3f} s per quick-profile iteration on the TUM pair; {detail}",
        ),
        row(
            "nnunet_iteration: forward, backward and optimiser share of an iteration",
            round(share, 3),
            "(info)",
            None,
            f"{share * none:.3f} of {none:.3f} s on one torch thread; loading and augmenting the batch is the "
            f"remaining {1 - share:.0%}, so moving it to the other core saves at most that",
        ),
    ]
