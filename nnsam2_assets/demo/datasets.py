"""Demo and test datasets written in the on-disk convention from synthetic phantoms (``demo.phantom``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk
import yaml

from nnsam2_assets.core.labels import TOTALSEG_LPM_IDS, class_map
from nnsam2_assets.core.storage import atomic_write_image, atomic_write_text
from nnsam2_assets.demo.phantom import DEFAULT_SHAPE_YX, DEFAULT_SPACING, Phantom, generate_cohort

KINDS = ("dixon", "ct", "t2")
# orientations cycled over scans when orientation_variety is on: canonical, in-plane flipped (RAS),
# z flipped (feet-first storage, the WORD trap)
_ORIENTATIONS = ("LPS", "RAS", "LPI")


def _orient(img: sitk.Image, code: str) -> sitk.Image:
    return img if code == "LPS" else sitk.DICOMOrient(img, code)


def _mapped_labels(phantom: Phantom, kind: str) -> np.ndarray:
    if kind == "ct":
        out = np.zeros(phantom.labels.shape, np.uint8)
        two = phantom.labels2
        for ours, theirs in TOTALSEG_LPM_IDS.items():
            out[two == ours] = theirs
        return out
    return phantom.labels.astype(np.uint8)


def write_demo_dataset(
    root: Path,
    name: str,
    kind: str,
    n_scans: int,
    seed: int,
    annotate: str = "middle",
    reference_index: int | None = None,
    with_experts: bool = True,
    orientation_variety: bool = True,
    variation: float = 1.0,
    shape_yx: tuple[int, int] = DEFAULT_SHAPE_YX,
    spacing: tuple[float, float, float] = DEFAULT_SPACING,
    regions_csv: bool = True,
) -> Path:
    """Write a synthetic dataset folder ``root/name`` in the on-disk dataset convention (``ingest.convention``); return it.

    kind "dixon" writes <id>_water/<id>_fat pairs with 4-class labels (1..4); "t2" single MRI scans with
    4-class labels; "ct" CT in HU with TotalSegmentator-like 2-class ids {87: right_lpm, 86: left_lpm}.
    The reference defaults to the cohort's population-mean member; ``annotate`` picks its middle or top
    (L3/L4) region slice. Volumes carry ``pad`` extra slices beyond the region. dataset.yaml marks the
    reference's region with its L4/L5 disc; with ``regions_csv`` every scan's region is listed in regions.csv
    too (indices in each file's own slice order; every other row lists them high-to-low), without it the
    pipeline finds the other scans' regions.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if annotate not in ("middle", "top"):
        raise ValueError(f"annotate must be 'middle' or 'top', got {annotate!r}")
    root = Path(root)
    folder = root / name
    cohort = generate_cohort(n_scans, seed, variation, shape_yx=shape_yx, spacing=spacing)
    ref_idx = cohort.typical_index if reference_index is None else int(reference_index)
    if not 0 <= ref_idx < n_scans:
        raise ValueError(f"reference_index {ref_idx} outside 0..{n_scans - 1}")
    ids = [f"subj{i:02d}" for i in range(n_scans)]
    region_rows = ["scan,first_slice,last_slice,l4_l5"]
    reference_region = {}
    for i, (scan_id, ph) in enumerate(zip(ids, cohort.members, strict=True)):
        code = _ORIENTATIONS[i % len(_ORIENTATIONS)] if orientation_variety else "LPS"
        nz = ph.labels.shape[0]
        lo, hi = ph.region
        mid = ph.disc_slices["L4/L5"]
        if code.endswith("I"):  # z flipped in the file: canonical slice k is file slice nz-1-k
            lo, hi, mid = nz - 1 - hi, nz - 1 - lo, nz - 1 - mid
        first, last = (hi, lo) if i % 2 else (lo, hi)
        region_rows.append(f"{scan_id},{first},{last},{mid}")
        if i == ref_idx:
            reference_region = {"first_slice": first, "last_slice": last, "l4_l5": mid}
        labels_img = ph._wrap(_mapped_labels(ph, kind))
        if kind == "dixon":
            water = _orient(ph.images["water"], code)
            fat = _orient(ph.images["fat"], code)
            if orientation_variety and i == 1:
                # the TUM trap: the fat file has its own origin on an identical voxel grid
                fat.SetOrigin(
                    tuple(o + d for o, d in zip(fat.GetOrigin(), (204.5, 147.9, 192.8), strict=True))
                )
            atomic_write_image(water, folder / "scans" / f"{scan_id}_water.nii.gz")
            atomic_write_image(fat, folder / "scans" / f"{scan_id}_fat.nii.gz")
        else:
            atomic_write_image(_orient(ph.images[kind], code), folder / "scans" / f"{scan_id}.nii.gz")
        if with_experts:
            atomic_write_image(_orient(labels_img, code), folder / "experts" / f"{scan_id}.nii.gz")
        if i == ref_idx:
            seed_slice = ph.seed_slice_middle if annotate == "middle" else ph.seed_slice_top
            ann = sitk.GetArrayFromImage(labels_img)
            ann[np.arange(nz) != seed_slice] = 0
            ann_img = ph._wrap(ann)
            atomic_write_image(_orient(ann_img, code), folder / "annotation.nii.gz")
    if regions_csv:
        atomic_write_text("\n".join(region_rows) + "\n", folder / "regions.csv")

    if kind == "ct":
        label_map = {TOTALSEG_LPM_IDS[k]: v for k, v in class_map(2).items()}
        modality, sequence = "ct", "ct"
    else:
        label_map = class_map(4)
        modality, sequence = "mri", kind
    cfg = {
        "modality": modality,
        "sequence": sequence,
        "reference": ids[ref_idx],
        "region": reference_region,
        "label_map": label_map,
        "description": (
            f"Synthetic lumbar phantom cohort ({kind}, {n_scans} scans, seed {seed}); reference {ids[ref_idx]} "
            f"is the population-mean subject, annotated on its {annotate} region slice. Generated by "
            "nnsam2_assets.demo; not real data."
        ),
    }
    atomic_write_text(yaml.safe_dump(cfg, sort_keys=False), folder / "dataset.yaml")
    return folder


def write_demo_cohort(root: Path, seed: int = 0, scans_per_dataset: int = 4) -> list[Path]:
    """The demo data root: "demo-dixon" (Dixon, 4-class, every region in regions.csv) and "demo-ct" (CT,
    TotalSegmentator-like 2-class, the reference's region only: the others are found)."""
    return [
        write_demo_dataset(root, "demo-dixon", "dixon", scans_per_dataset, seed),
        write_demo_dataset(
            root, "demo-ct", "ct", scans_per_dataset, seed + 1, annotate="top", regions_csv=False
        ),
    ]
