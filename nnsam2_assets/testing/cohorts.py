"""Small phantom datasets of controlled size, taking one scan out of a dataset folder and back, and the
two-blob volumes the SAM2 tests and benchmark track."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from nnsam2_assets.demo.datasets import write_demo_dataset

SMALL = {"shape_yx": (64, 64), "spacing": (3.2, 3.2, 4.0)}
# the same field of view at 1.28 mm: big enough that holding 20 scans' arrays at once would show in RSS
MEDIUM = {"shape_yx": (160, 160), "spacing": (1.28, 1.28, 4.0)}


def write_tiny_dataset(
    data_root: Path, name: str, n_scans: int, seed: int = 0, kind: str = "dixon", grid: dict | None = None
) -> Path:
    """A small-grid phantom dataset (64x64 in-plane unless ``grid``) whose reference is scan 0 (so scans can
    be held out)."""
    return write_demo_dataset(
        Path(data_root),
        name,
        kind,
        n_scans,
        seed,
        reference_index=0,
        annotate="top" if kind == "ct" else "middle",
        **(grid or SMALL),
    )


def write_tiny(data_root: Path, name: str = "tiny", n_scans: int = 3, seed: int = 3) -> Path:
    """A tiny phantom Dixon dataset (64x64 in-plane, the cohort's typical reference): ingest takes seconds."""
    return write_demo_dataset(data_root, name, "dixon", n_scans, seed=seed, **SMALL)


def _scan_files(folder: Path, scan_id: str) -> list[Path]:
    out = []
    for sub in ("scans", "experts"):
        out += sorted((folder / sub).glob(f"{scan_id}.nii.gz")) + sorted((folder / sub).glob(f"{scan_id}_*"))
    return out


def hide_scan(folder: Path, scan_id: str, aside: Path) -> None:
    """Take a scan out of a dataset folder (files and its regions.csv row) into ``aside``."""
    aside.mkdir(parents=True, exist_ok=True)
    for f in _scan_files(folder, scan_id):
        dest = aside / f.relative_to(folder)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(f), str(dest))
    regions = folder / "regions.csv"
    lines = regions.read_text().splitlines()
    keep = [ln for ln in lines if not ln.startswith(f"{scan_id},")]
    (aside / f"{scan_id}.regions").write_text("\n".join(ln for ln in lines if ln not in keep))
    regions.write_text("\n".join(keep) + "\n")


def restore_scan(folder: Path, scan_id: str, aside: Path) -> None:
    """Put a hidden scan back (the "new scan arrives" event)."""
    for f in sorted(p for p in aside.rglob("*") if p.is_file() and not p.name.endswith(".regions")):
        if f.name.startswith(f"{scan_id}.") or f.name.startswith(f"{scan_id}_"):
            dest = folder / f.relative_to(aside)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(f), str(dest))
    row = (aside / f"{scan_id}.regions").read_text().strip()
    (aside / f"{scan_id}.regions").unlink()
    regions = folder / "regions.csv"
    regions.write_text(regions.read_text().rstrip("\n") + "\n" + row + "\n")


def two_blob_volume(n: int, hw: tuple[int, int] = (64, 64), shift: int = 0, seed: int = 0) -> np.ndarray:
    """MRI-like volume: noisy background with two bright 'muscles' drifting slowly along z."""
    rng = np.random.default_rng(seed)
    vol = rng.normal(100, 10, size=(n, *hw)).astype(np.float32)
    h, w = hw
    for z in range(n):
        top = h // 4 + z // 2 + shift
        vol[z, top : top + h // 3, w // 8 : w // 8 + w // 4] += 200
        vol[z, top : top + h // 3, w - w // 8 - w // 4 : w - w // 8] += 200
    return vol


def two_blob_annotation(volume: np.ndarray, seed_slice: int) -> np.ndarray:
    """The bright blobs of one slice of ``two_blob_volume``: 1 on the patient's right (low x), 2 on the left."""
    ann = np.zeros(volume.shape, dtype=np.uint8)
    bright = volume[seed_slice] > 200
    w = volume.shape[2]
    ann[seed_slice][:, : w // 2][bright[:, : w // 2]] = 1
    ann[seed_slice][:, w // 2 :][bright[:, w // 2 :]] = 2
    return ann
