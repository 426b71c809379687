"""Shared helpers of ``bench/run.py`` and the fault tests: tiny phantom datasets, scan hold-out, the Dagster
per-dataset chain and a Dagster-free "direct" path that mirrors the assets with the same lib functions."""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import SimpleITK as sitk

from nnsam2_assets.defs.resources import NnsamStorage, PropagationSettings, RefinementSettings

SMALL = {"shape_yx": (64, 64), "spacing": (3.2, 3.2, 4.0)}
from nnsam2_assets.defs.selections import PER_DATASET  # noqa: E402,F401


def write_tiny_dataset(data_root: Path, name: str, n_scans: int, seed: int = 0, kind: str = "dixon") -> Path:
    """A small-grid phantom dataset (64x64 in-plane) whose reference is scan 0 (so scans can be held out)."""
    from nnsam2_assets.lib.phantom import write_demo_dataset

    return write_demo_dataset(
        Path(data_root),
        name,
        kind,
        n_scans,
        seed,
        reference_index=0,
        annotate="top" if kind == "ct" else "middle",
        **SMALL,
    )


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


def resources(data_root: Path, storage_root: Path, refinement: RefinementSettings | None = None) -> dict:
    from dagster_duckdb import DuckDBResource

    return {
        "storage": NnsamStorage(data_root=str(data_root), storage_root=str(storage_root)),
        "propagation": PropagationSettings(),
        "refinement": refinement or RefinementSettings(),
        "metrics_db": DuckDBResource(database=str(Path(storage_root) / "nnsam2.duckdb")),
    }


def register(instance: dg.DagsterInstance, names: list[str]) -> None:
    known = set(instance.get_dynamic_partitions("datasets"))
    new = [n for n in names if n not in known]
    if new:
        instance.add_dynamic_partitions("datasets", new)


@dataclass
class ChainRun:
    seconds: float
    result: dg.ExecuteInProcessResult


def run_selection(instance, res: dict, name: str | None, selection: list[str], assets=None) -> ChainRun:
    """One in-process Dagster run (``dg.materialize``) of ``selection`` for partition ``name``."""
    from nnsam2_assets.definitions import all_assets

    t0 = time.perf_counter()
    result = dg.materialize(
        assets if assets is not None else all_assets(),
        selection=selection,
        partition_key=name,
        instance=instance,
        resources=res,
        raise_on_error=False,
    )
    return ChainRun(time.perf_counter() - t0, result)


def step_durations(result) -> dict[str, float]:
    """Seconds per step from STEP_SUCCESS events."""
    out = {}
    for ev in result.all_events:
        if ev.event_type_value == "STEP_SUCCESS":
            out[ev.step_key] = ev.event_specific_data.duration_ms / 1000.0
    return out


def direct_chain(data_root: Path, storage_root: Path, name: str) -> dict:
    """The per-dataset chain (scans -> pseudo_labels) without Dagster: the same lib calls, the same files,
    the same per-scan cache keys, in one process. UI-only metadata (overlay PNGs, markdown tables) is left
    out, so the Dagster/direct ratio also charges the assets' preview rendering to Dagster (conservative)."""
    from nnsam2_assets.defs.ingest import INGEST_VERSION
    from nnsam2_assets.defs.propagation import FRAMES_VERSION, PROPAGATION_VERSION
    from nnsam2_assets.lib import frames as frames_lib
    from nnsam2_assets.lib.cache import ScanCache, cache_key
    from nnsam2_assets.lib.dataset import load_dataset, validate_annotation
    from nnsam2_assets.lib.imaging import ScanError, read_image
    from nnsam2_assets.lib.ingest import prepare_scan, source_hash
    from nnsam2_assets.lib.layout import DatasetLayout
    from nnsam2_assets.lib.propagation.base import build_propagator
    from nnsam2_assets.lib.pseudolabels import (
        SelectionConfig,
        pseudo_label_volume,
        select_slices,
        slice_table,
    )
    from nnsam2_assets.lib.ranking import rank_references
    from nnsam2_assets.lib.storage import (
        atomic_write_dataframe,
        atomic_write_image,
        atomic_write_json,
        sha256_file,
    )

    spec = load_dataset(Path(data_root), name)
    layout = DatasetLayout(Path(storage_root), name)
    # scans
    cache = ScanCache(layout.dir("scans"))
    rows = []
    for scan_id, source in spec.scans.items():
        try:
            key = cache_key(INGEST_VERSION, source_hash(source, spec))
            prepared = prepare_scan(spec, source)
            atomic_write_image(prepared.image, layout.scan_image(scan_id))
            if prepared.fat is not None:
                atomic_write_image(prepared.fat, layout.scan_fat(scan_id))
            if prepared.expert is not None:
                atomic_write_image(prepared.expert, layout.scan_expert(scan_id))
            cache.record(scan_id, key)
            rows.append({"scan": scan_id, "status": "ok", "error": "", "source_hash": key})
        except ScanError as exc:
            rows.append({"scan": scan_id, "status": "error", "error": str(exc)})
    manifest = pd.DataFrame(rows)
    atomic_write_dataframe(manifest, layout.manifest)
    ok = sorted(manifest.scan[manifest.status == "ok"])
    hashes = dict(zip(manifest.scan, manifest.get("source_hash", pd.Series(dtype=str)), strict=False))
    # reference_annotation
    annotation = validate_annotation(
        read_image(spec.annotation), read_image(spec.scans[spec.reference].image), spec, spec.annotation
    )
    atomic_write_image(annotation.labels, layout.annotation)
    ann_hash = sha256_file(spec.annotation)
    atomic_write_json(
        {"reference": spec.reference, "seed_slice": annotation.seed_slice, "annotation_sha256": ann_hash},
        layout.annotation_meta,
    )
    seed = annotation.seed_slice
    # reference_ranking
    volumes = {s: sitk.GetArrayFromImage(sitk.ReadImage(str(layout.scan_image(s)))) for s in ok}
    atomic_write_dataframe(
        rank_references(volumes, spec.modality), layout.dir("reference_ranking") / "ranking.csv"
    )
    # frame_stacks
    fcache = ScanCache(layout.dir("frame_stacks"))
    reference = frames_lib.normalise_for_frames(volumes[spec.reference], spec.modality)
    for scan_id in ok:
        folder = layout.frames(scan_id)
        target = frames_lib.normalise_for_frames(volumes[scan_id], spec.modality)
        seqs = frames_lib.build_frame_sequence(
            reference, target, seed, ref_scan=spec.reference, tgt_scan=scan_id
        )
        maps = [frames_lib.write_frame_stack(seq, folder / d) for d, seq in seqs.items()]
        atomic_write_dataframe(pd.concat(maps, ignore_index=True), folder / "frame_map.parquet")
        fcache.record(scan_id, cache_key(FRAMES_VERSION, hashes[scan_id], ann_hash))
    # propagated_masks
    pcache = ScanCache(layout.dir("propagated_masks"))
    propagator = build_propagator("registration")
    ref_img = sitk.ReadImage(str(layout.scan_image(spec.reference)))
    ann_img = sitk.ReadImage(str(layout.annotation))
    for scan_id in ok:
        target = sitk.ReadImage(str(layout.scan_image(scan_id)))
        result = propagator.propagate(ref_img, ann_img, seed, target, spec.modality)
        mask = sitk.GetImageFromArray(result.masks.astype(np.uint8))
        mask.CopyInformation(target)
        atomic_write_image(mask, layout.masks(scan_id))
        table = result.confidence.assign(scan=scan_id, backend=result.backend, model_id=result.model_id)
        atomic_write_dataframe(table, layout.confidence(scan_id))
        pcache.record(scan_id, cache_key(PROPAGATION_VERSION, hashes[scan_id], ann_hash, "registration"))
    # pseudo_labels
    cfg = SelectionConfig()
    tables = []
    masks = {}
    for scan_id in ok:
        masks[scan_id] = sitk.ReadImage(str(layout.masks(scan_id)))
        conf = pd.read_parquet(layout.confidence(scan_id))
        arr = sitk.GetArrayFromImage(masks[scan_id])
        tables.append(slice_table(name, scan_id, arr, conf, spec.n_classes, cfg))
    table = select_slices(pd.concat(tables, ignore_index=True), cfg)
    for scan_id, group in table.groupby("scan"):
        volume = pseudo_label_volume(
            sitk.GetArrayFromImage(masks[scan_id]), group.slice[group.kept].to_numpy(), spec.n_classes
        )
        out = sitk.GetImageFromArray(volume)
        out.CopyInformation(masks[scan_id])
        atomic_write_image(out, layout.pseudo_label(scan_id))
    atomic_write_dataframe(table, layout.pseudo_selection)
    return {"n_scans": len(ok)}


def peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def dump(obj, path: Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(obj, indent=2, default=str))
