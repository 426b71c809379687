"""bench.gpu_check runs where CI has no GPU only when someone is lent one: its nnU-Net part runs here on the
CPU, at a tiny size, so the script does not rot between such loans."""

from __future__ import annotations

import bench.gpu_check as gpu_check


def test_the_gpu_checks_nnunet_part_trains_predicts_and_scores_on_the_cpu():
    (row,) = gpu_check.nnunet_rows(2, device="cpu", profiles=("quick",), shape=(6, 48, 64))
    assert row["device"] == "cpu" and row["profile"] == "quick" and row["configuration"] == "2d"
    assert row["iterations"] == 4  # two epochs of two
    assert row["s_per_iteration"] > 0 and row["predict_s_per_scan"] > 0 and row["train_wall_s"] > 0
    assert len(row["dice_on_a_training_scan"]) == 2
    assert all(0.0 <= d <= 1.0 for d in row["dice_on_a_training_scan"])
