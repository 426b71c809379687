"""A published model's files as the pipeline checks them, for tests of which models count as current."""

from __future__ import annotations

from pathlib import Path

from nnsam2_assets.refinement.nnunet import MODEL_INFO_FILE, ModelInfo


def write_model_stub(model_dir: Path) -> Path:
    """A model folder with a readable record and a checkpoint with content (not weights that load)."""
    info = ModelInfo(
        model_dir=Path(model_dir), configuration="2d", fold="all", trainer_name="stub", profile="quick",
        class_names=["right_lpm", "left_lpm"], use_ignore=True, num_training_cases=1, num_epochs=1,
        iterations_per_epoch=1, seed=0, device="cpu", patch_size=[8, 8], batch_size=1, spacing=[2.0, 2.0],
        train_seconds=0.0, total_seconds=0.0, seconds_per_iteration=0.0,
    )  # fmt: skip
    info.checkpoint.parent.mkdir(parents=True, exist_ok=True)
    info.checkpoint.write_bytes(b"weights")
    (Path(model_dir) / MODEL_INFO_FILE).write_text(info.to_json())
    return Path(model_dir)
