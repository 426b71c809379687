"""``python -m bench.gpu_check`` needs a GPU, which CI never has and this project is lent only at times: its
nnU-Net part runs here on the CPU, small, so the script does not rot between such loans (as the bench smoke
test, a separate process: the tests never import the benchmarks)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_gpu_checks_nnunet_part_trains_predicts_and_scores_on_the_cpu(tmp_path):
    out = tmp_path / "gpu_check.json"
    command = [sys.executable, "-m", "bench.gpu_check", "--device", "cpu", "--skip", "sam2"]
    command += ["--profiles", "quick", "--iterations", "2", "--shape", "6", "48", "64", "--json", str(out)]
    proc = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    payload = json.loads(out.read_text())
    assert "cores" in payload["machine"] and payload["gpu"] == "none"
    (row,) = payload["rows"]
    assert row["device"] == "cpu" and row["profile"] == "quick" and row["configuration"] == "2d"
    assert row["iterations"] == 4  # two epochs of two
    assert row["s_per_iteration"] > 0 and row["predict_s_per_scan"] > 0 and row["train_wall_s"] > 0
    assert row["compile"] is False and row["first_epoch_s"] > 0 and row["s_per_iteration_last_epoch"] > 0
    assert len(row["dice_on_a_training_scan"]) == 2
    assert all(0.0 <= d <= 1.0 for d in row["dice_on_a_training_scan"])


def test_the_gpu_check_refuses_sam2_at_full_size_on_a_cpu():
    proc = subprocess.run(
        [sys.executable, "-m", "bench.gpu_check", "--device", "cpu"], capture_output=True, text=True, cwd=ROOT
    )
    assert proc.returncode != 0 and "--skip sam2" in proc.stderr
