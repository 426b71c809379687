"""Where each artefact lives under the storage root (one place, so assets and tools agree).

<root>/datasets/<dataset>/<asset>/<scan>...     per-dataset, per-scan artefacts
<root>/models/<stage>/<version>/                nnU-Net models, never overwritten in place
<root>/nnunet/                                  nnU-Net raw/preprocessed working dirs
<root>/nnsam2.duckdb                            metrics
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class DatasetLayout:
    root: Path
    dataset: str

    @property
    def base(self) -> Path:
        return Path(self.root) / "datasets" / self.dataset

    def dir(self, asset: str) -> Path:
        return self.base / asset

    # ingest
    @property
    def manifest(self) -> Path:
        return self.dir("scans") / "manifest.parquet"

    def scan_image(self, scan: str) -> Path:
        return self.dir("scans") / f"{scan}.nii.gz"

    def scan_fat(self, scan: str) -> Path:
        return self.dir("scans") / f"{scan}_fat.nii.gz"

    def scan_expert(self, scan: str) -> Path:
        return self.dir("scans") / "experts" / f"{scan}.nii.gz"

    @property
    def annotation(self) -> Path:
        return self.dir("reference_annotation") / "annotation.nii.gz"

    @property
    def annotation_meta(self) -> Path:
        return self.dir("reference_annotation") / "annotation.json"

    # propagation
    def frames(self, scan: str) -> Path:
        return self.dir("frame_stacks") / scan

    def masks(self, scan: str) -> Path:
        return self.dir("propagated_masks") / f"{scan}.nii.gz"

    def confidence(self, scan: str) -> Path:
        return self.dir("propagated_masks") / f"{scan}_confidence.parquet"

    def pseudo_label(self, scan: str) -> Path:
        return self.dir("pseudo_labels") / f"{scan}.nii.gz"

    @property
    def pseudo_selection(self) -> Path:
        return self.dir("pseudo_labels") / "selection.parquet"

    # refinement
    def final_mask(self, scan: str) -> Path:
        return self.dir("final_masks") / f"{scan}.nii.gz"

    def final_mask_canonical(self, scan: str) -> Path:
        return self.dir("final_masks") / "canonical" / f"{scan}.nii.gz"


def model_root(root: Path, stage: str) -> Path:
    return Path(root) / "models" / stage


def stage_prediction(model_dir: Path, dataset: str, scan: str) -> Path:
    return Path(model_dir) / "predictions" / dataset / f"{scan}.nii.gz"
