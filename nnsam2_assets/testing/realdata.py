"""The real data the tests and benchmarks read (``NNSAM2_SHARED_DATA``, default ``../shared/data`` beside
the checkout), and builders of dataset folders over it: files are symlinked, never copied."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import yaml

from nnsam2_assets.core.labels import TOTALSEG_LPM_IDS, class_map
from nnsam2_assets.core.layout import ALLOWED_ROOTS_ENV
from nnsam2_assets.propagation.prompts import only_slice as one_slice_annotation
from nnsam2_assets.testing.clicks import clicks_from_labels, write_click_csv, write_markups

SHARED_DATA = Path(
    os.environ.get("NNSAM2_SHARED_DATA", Path(__file__).resolve().parents[3] / "shared" / "data")
)
TUM = SHARED_DATA / "myosegmentum"
TS = SHARED_DATA / "totalsegmentator"
CHAOS = SHARED_DATA / "chaos_unlabeled"
TUM_LABEL_MAP = class_map(4)  # MyoSegmenTUM ids are ours (checked by position and size)


def tum_canonical(case: str) -> tuple[sitk.Image, np.ndarray]:
    """A MyoSegmenTUM subject on the canonical (LPS) grid: the water image as float32 and its 4-class expert
    labels as an array. The water image and the watergrid labels share the same origin-less affine, so they
    pair by array index."""
    water = sitk.DICOMOrient(sitk.ReadImage(str(TUM / f"{case}_water.nii.gz"), sitk.sitkFloat32), "LPS")
    labels = sitk.DICOMOrient(sitk.ReadImage(str(TUM / f"{case}_label_watergrid.nii.gz")), "LPS")
    return water, sitk.GetArrayFromImage(labels).astype(np.uint8)


def slice_annotation(labels: np.ndarray, z: int, like: sitk.Image) -> sitk.Image:
    """An annotation on ``like``'s grid holding only slice ``z`` of the label array ``labels``."""
    image = sitk.GetImageFromArray(labels.astype(np.uint8))
    image.CopyInformation(like)
    return one_slice_annotation(image, z)


def shared_file(path: Path) -> Path:
    """``path`` under the shared data, which must be there: a real-data test fails, never skips, without it."""
    if not Path(path).exists():
        raise FileNotFoundError(
            f"{path}: the real data is missing (set NNSAM2_SHARED_DATA to the shared data folder)"
        )
    return Path(path)


def allow_shared_data() -> None:
    """Let datasets built here read through their symlinks into the shared data (``NNSAM2_ALLOWED_ROOTS``);
    child processes inherit it."""
    roots = [r for r in os.environ.get(ALLOWED_ROOTS_ENV, "").split(os.pathsep) if r]
    if str(SHARED_DATA.resolve()) not in roots:
        os.environ[ALLOWED_ROOTS_ENV] = os.pathsep.join([*roots, str(SHARED_DATA.resolve())])


def _link(src: Path, dst: Path) -> None:
    allow_shared_data()
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.symlink_to(src)


def write_yaml(path: Path, cfg: dict) -> None:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))


def tum_dataset(
    root: Path,
    name: str = "tum",
    reference: str = "TUM01",
    seed_z: int | None = None,
    extra_slices: tuple[int, ...] = (),
) -> Path:
    """Both MyoSegmenTUM Dixon subjects with their manual 4-class labels; annotation = one slice of
    ``reference`` (the middle one unless ``seed_z``), plus its ``extra_slices`` when given."""
    folder = root / name
    for case in ("TUM01", "TUM02"):
        _link(TUM / f"{case}_water.nii.gz", folder / "scans" / f"{case}_water.nii.gz")
        _link(TUM / f"{case}_fat.nii.gz", folder / "scans" / f"{case}_fat.nii.gz")
        _link(TUM / f"{case}_label_watergrid.nii.gz", folder / "experts" / f"{case}.nii.gz")
    labels = sitk.ReadImage(str(TUM / f"{reference}_label_watergrid.nii.gz"))
    z = labels.GetSize()[2] // 2 if seed_z is None else seed_z
    annotation = one_slice_annotation(labels, z)
    if extra_slices:
        arr, full = sitk.GetArrayFromImage(annotation), sitk.GetArrayFromImage(labels)
        arr[list(extra_slices)] = full[list(extra_slices)]
        annotation = sitk.GetImageFromArray(arr)
        annotation.CopyInformation(labels)
    sitk.WriteImage(annotation, str(folder / "annotation.nii.gz"))
    write_yaml(
        folder / "dataset.yaml",
        {"modality": "mri", "sequence": "dixon", "reference": reference, "label_map": TUM_LABEL_MAP},
    )
    return folder


def tum_click_dataset(root: Path, name: str, reference: str, file_format: str = "csv") -> Path:
    """The TUM pair with click prompts on ``reference``'s middle slice, made from its expert labels, in place
    of the drawn annotation: ``annotation.csv`` or ``annotation.mrk.json`` (``file_format`` "csv" or "mrk")."""
    folder = tum_dataset(root, name, reference)
    (folder / "annotation.nii.gz").unlink()
    labels = sitk.ReadImage(str(TUM / f"{reference}_label_watergrid.nii.gz"))
    clicks = clicks_from_labels(labels, labels.GetSize()[2] // 2)
    if file_format == "csv":
        write_click_csv(clicks, 4, folder / "annotation.csv")
    else:
        write_markups(clicks, 4, folder / "annotation.mrk.json")
    return folder


def ct_dataset(root: Path, name: str = "ts-ct") -> Path:
    """The TotalSegmentator CT volume and the DICOM series; label files use ids 87/86 (autochthon R/L)."""
    folder = root / name
    _link(TS / "example_ct_sm.nii.gz", folder / "scans" / "ctsm.nii.gz")
    _link(TS / "example_ct_sm_seg_total.nii.gz", folder / "experts" / "ctsm.nii.gz")
    _link(TS / "example_ct_dicom", folder / "scans" / "ctdicom")
    _link(TS / "example_ct_dicom_seg_total_fast.nii.gz", folder / "experts" / "ctdicom.nii.gz")
    seg = sitk.ReadImage(str(TS / "example_ct_sm_seg_total.nii.gz"))
    arr = sitk.GetArrayFromImage(seg)
    both = [z for z in range(arr.shape[0]) if all((arr[z] == i).any() for i in TOTALSEG_LPM_IDS.values())]
    z = both[len(both) // 2]
    ann = one_slice_annotation(seg, z)
    a = sitk.GetArrayFromImage(ann)
    a[~np.isin(a, list(TOTALSEG_LPM_IDS.values()))] = 0
    clean = sitk.GetImageFromArray(a)
    clean.CopyInformation(seg)
    sitk.WriteImage(clean, str(folder / "annotation.nii.gz"))
    write_yaml(
        folder / "dataset.yaml",
        {
            "modality": "ct",
            "sequence": "ct",
            "reference": "ctsm",
            "label_map": {TOTALSEG_LPM_IDS[c]: name for c, name in class_map(2).items()},
        },
    )
    return folder
