"""nnU-Net raw dataset writer (DatasetXXX_Name/imagesTr, labelsTr, dataset.json)."""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ._common import CHANNEL_NAME


@dataclass(frozen=True)
class TrainingCase:
    case_id: str
    image: Path  # NIfTI, canonical LPS
    label: Path  # NIfTI uint8 on the image grid


@dataclass(frozen=True)
class RawDataset:
    folder: Path  # <root>/DatasetXXX_Name
    dataset_id: int
    name: str  # DatasetXXX_Name
    case_ids: dict[str, str]  # original case id -> nnU-Net-safe id
    labels: dict[str, int]


def sanitize_case_id(case_id: str) -> str:
    """nnU-Net-safe identifier: [A-Za-z0-9_-], no dots (file endings), never empty."""
    safe = re.sub(r"[^A-Za-z0-9_-]+", "_", str(case_id)).strip("_-")
    return safe or "case"


def _unique_ids(case_ids: Sequence[str]) -> dict[str, str]:
    if len(set(case_ids)) != len(case_ids):
        raise ValueError("duplicate case ids")
    out: dict[str, str] = {}
    used: set[str] = set()
    for cid in case_ids:
        base = sanitize_case_id(cid)
        safe, n = base, 1
        while safe.lower() in used:  # case-insensitive: safe on case-insensitive filesystems too
            n += 1
            safe = f"{base}_{n}"
        used.add(safe.lower())
        out[cid] = safe
    return out


def dataset_name(dataset_id: int, name: str) -> str:
    if not 1 <= dataset_id <= 999:
        raise ValueError(f"dataset_id must be 1..999, got {dataset_id}")
    safe = re.sub(r"[^A-Za-z0-9]+", "", name) or "Data"
    return f"Dataset{dataset_id:03d}_{safe}"


def _canonical(img: sitk.Image) -> sitk.Image:
    if np.allclose(np.asarray(img.GetDirection()), np.eye(img.GetDimension()).ravel(), atol=1e-5):
        return img
    return sitk.DICOMOrient(img, "LPS")


def _write_nifti(img: sitk.Image, path: Path) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    sitk.WriteImage(img, str(tmp), useCompression=True)
    os.replace(tmp, path)


def write_raw_dataset(
    root: Path,
    dataset_id: int,
    name: str,
    cases: Sequence[TrainingCase],
    class_names: Sequence[str],
    use_ignore: bool,
) -> RawDataset:
    """Write ``<root>/DatasetXXX_Name`` in nnU-Net raw layout (replacing an existing one).

    Labels must be 0..K (K = len(class_names)), plus K+1 ("ignore") when ``use_ignore``. Images/labels are
    reoriented to canonical LPS if needed; a label whose grid does not match its image is an error.
    """
    if not cases:
        raise ValueError("no training cases")
    k = len(class_names)
    labels = {"background": 0, **{str(n): i + 1 for i, n in enumerate(class_names)}}
    if use_ignore:
        labels["ignore"] = k + 1
    max_label = k + 1 if use_ignore else k
    ids = _unique_ids([c.case_id for c in cases])
    ds_name = dataset_name(dataset_id, name)
    folder = Path(root) / ds_name
    if folder.exists():
        shutil.rmtree(folder)
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    for case in cases:
        img = _canonical(sitk.ReadImage(str(case.image)))
        if img.GetNumberOfComponentsPerPixel() != 1 or img.GetDimension() != 3:
            raise ValueError(f"{case.case_id}: expected a single-channel 3-D image")
        lab = _canonical(sitk.ReadImage(str(case.label)))
        if lab.GetSize() != img.GetSize() or not np.allclose(lab.GetSpacing(), img.GetSpacing(), rtol=1e-3):
            raise ValueError(
                f"{case.case_id}: label grid {lab.GetSize()} does not match image {img.GetSize()}"
            )
        arr = sitk.GetArrayViewFromImage(lab)
        if arr.min() < 0 or arr.max() > max_label:
            raise ValueError(f"{case.case_id}: label values must be in 0..{max_label}, got max {arr.max()}")
        lab = sitk.Cast(lab, sitk.sitkUInt8)
        lab.CopyInformation(img)  # nnU-Net demands identical origin/direction, tiny float drift included
        safe = ids[case.case_id]
        _write_nifti(img, folder / "imagesTr" / f"{safe}_0000.nii.gz")
        _write_nifti(lab, folder / "labelsTr" / f"{safe}.nii.gz")
    meta = {
        "channel_names": {"0": CHANNEL_NAME},
        "labels": labels,
        "numTraining": len(cases),
        "file_ending": ".nii.gz",
        "name": ds_name,
    }
    (folder / "dataset.json").write_text(json.dumps(meta, indent=2))
    return RawDataset(folder, dataset_id, ds_name, ids, labels)
