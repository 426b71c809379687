"""The per-dataset chain, ingest to pseudo-labels, as plain functions over a dataset's storage layout.

Each function does one asset's work and returns a report; the Dagster assets (defs/ingest.py,
defs/propagation.py) only turn reports into metadata, and bench/run.py calls the same functions without
Dagster to measure what the framework adds.

Every step is incremental per scan (lib/cache.py). A scan whose inputs are unchanged is neither recomputed
nor read again: its summary is kept with its cache key, so adding one scan to a dataset of N costs about one
scan's work, not N scans' reads.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk

from nnsam2_assets.lib import frames as frames_lib
from nnsam2_assets.lib.cache import ScanCache, cache_key
from nnsam2_assets.lib.dataset import DatasetSpec, ScanSource, merge_sides, validate_annotation
from nnsam2_assets.lib.imaging import ScanError, read_image
from nnsam2_assets.lib.ingest import prepare_scan, source_hash
from nnsam2_assets.lib.layout import DatasetLayout
from nnsam2_assets.lib.propagation.base import Propagator
from nnsam2_assets.lib.pseudolabels import (
    SelectionConfig,
    dice_per_class,
    pseudo_label_volume,
    select_slices,
    slice_table,
)
from nnsam2_assets.lib.ranking import rank_features, scan_features
from nnsam2_assets.lib.storage import (
    atomic_write_dataframe,
    atomic_write_image,
    atomic_write_json,
    sha256_file,
    sha256_strings,
)

INGEST_VERSION = "ingest-v1"
RANKING_VERSION = "ranking-v1"
FRAMES_VERSION = "frames-v1"
PROPAGATION_VERSION = "propagation-v1"
PSEUDO_VERSION = "pseudo-v2"

Log = Callable[[str], None]


def _silent(_: str) -> None:
    pass


def _read(path: Path) -> sitk.Image:
    return sitk.ReadImage(str(path))


def _array(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(_read(path))


def read_manifest(layout: DatasetLayout) -> pd.DataFrame:
    if not layout.manifest.exists():
        return pd.DataFrame(columns=["status"]).rename_axis("scan")
    return pd.read_parquet(layout.manifest).set_index("scan")


def ok_scans(layout: DatasetLayout, manifest: pd.DataFrame | None = None) -> list[str]:
    """Scans that passed ingest; pass the ``read_manifest`` result when the caller has it already."""
    manifest = read_manifest(layout) if manifest is None else manifest
    return sorted(manifest.index[manifest.status == "ok"].tolist())


def read_annotation_meta(layout: DatasetLayout) -> dict:
    return json.loads(layout.annotation_meta.read_text())


# ------------------------------------------------------------------------------------------------ ingest
@dataclass
class IngestReport:
    manifest: pd.DataFrame
    computed: int

    @property
    def good(self) -> pd.DataFrame:
        return self.manifest[self.manifest.status == "ok"]

    @property
    def failed(self) -> pd.DataFrame:
        return self.manifest[self.manifest.status != "ok"]

    @property
    def data_version(self) -> str:
        return cache_key(*sorted(f"{r.scan}:{r.source_hash}" for r in self.good.itertuples()))


def _file_stats(path: Path) -> list[str]:
    files = sorted(p for p in Path(path).rglob("*") if p.is_file()) if Path(path).is_dir() else [Path(path)]
    out = []
    for f in files:
        st = os.stat(f)
        # ctime as well: `cp -p` or `rsync -t` over an existing file keeps size, mtime and inode, but
        # no user call can set ctime back
        out.append(f"{f}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:{st.st_ino}")
    return out


def stat_signature(source: ScanSource, spec: DatasetSpec) -> str:
    """Size, mtime, ctime and inode of a scan's files plus its ingest settings. Like git's index: when it matches
    the recorded one, the content hash recorded with it is reused instead of re-reading every source file
    on every run (tens of MB per scan)."""
    parts: list[str] = []
    for path in (source.image, source.fat, source.expert):
        if path is not None:
            parts += _file_stats(path)
    parts += [str(spec.regions.get(source.scan_id)), str(sorted(spec.label_map.items())), spec.modality]
    return sha256_strings(parts)


def ingest_scans(spec: DatasetSpec, layout: DatasetLayout, log: Log = _silent) -> IngestReport:
    """Every scan reoriented to LPS and cropped to its region; a bad scan becomes an error row, not a failure."""
    cache = ScanCache(layout.dir("scans"))
    rows, computed = [], 0
    for scan_id, source in spec.scans.items():
        outputs = [layout.scan_image(scan_id)]
        try:
            signature = stat_signature(source, spec)
            info = cache.info(scan_id)
            if (
                info
                and info.get("stat") == signature
                and cache.is_fresh(scan_id, info["row"]["source_hash"], outputs)
            ):
                rows.append(info["row"])
                continue
            key = cache_key(INGEST_VERSION, source_hash(source, spec))
            if info and cache.is_fresh(scan_id, key, outputs):  # touched, same content
                cache.record(scan_id, key, {"stat": signature, "row": info["row"]})
                rows.append(info["row"])
                continue
            prepared = prepare_scan(spec, source)
            atomic_write_image(prepared.image, layout.scan_image(scan_id))
            if prepared.fat is not None:
                atomic_write_image(prepared.fat, layout.scan_fat(scan_id))
            if prepared.expert is not None:
                atomic_write_image(prepared.expert, layout.scan_expert(scan_id))
            size = prepared.image.GetSize()
            row = {
                "scan": scan_id,
                "status": "ok",
                "error": "",
                "source": str(source.image),
                "source_hash": key,
                "shape_zyx": f"{size[2]}x{size[1]}x{size[0]}",
                "spacing_mm": ",".join(f"{s:.3f}" for s in prepared.image.GetSpacing()),
                "original_orientation": prepared.original.orientation(),
                "region": "" if prepared.region is None else f"{prepared.region[0]}-{prepared.region[1]}",
                "has_fat": prepared.fat is not None,
                "has_expert": prepared.expert is not None,
                "notes": "; ".join(prepared.notes),
            }
            cache.record(scan_id, key, {"stat": signature, "row": row})
            computed += 1
            rows.append(row)
        except ScanError as exc:
            log(f"scan {scan_id} excluded: {exc}")
            rows.append({"scan": scan_id, "status": "error", "error": str(exc), "source": str(source.image)})
    cache.forget_others(set(spec.scans))
    manifest = pd.DataFrame(rows).fillna({"error": "", "notes": ""})
    atomic_write_dataframe(manifest, layout.manifest)
    return IngestReport(manifest, computed)


# ------------------------------------------------------------------------------------ reference annotation
@dataclass
class AnnotationReport:
    meta: dict
    reference_slice: np.ndarray  # the annotated slice of the reference (canonical crop)
    label_slice: np.ndarray
    n_slices: int
    data_version: str


def write_reference_annotation(spec: DatasetSpec, layout: DatasetLayout) -> AnnotationReport:
    """The one annotated axial slice, validated against the reference scan and put on its canonical crop."""
    if spec.reference not in set(ok_scans(layout)):
        raise ScanError(
            spec.scans[spec.reference].image, "the reference scan failed ingest (see the scans asset)"
        )
    reference_original = read_image(spec.scans[spec.reference].image)
    annotation = validate_annotation(read_image(spec.annotation), reference_original, spec, spec.annotation)
    atomic_write_image(annotation.labels, layout.annotation)
    ann_hash = sha256_file(spec.annotation)
    meta = {
        "reference": spec.reference,
        "seed_slice": annotation.seed_slice,
        "n_classes": spec.n_classes,
        "annotation_sha256": ann_hash,
        "source": str(spec.annotation),
    }
    atomic_write_json(meta, layout.annotation_meta)
    ref = _array(layout.scan_image(spec.reference))
    z = annotation.seed_slice
    return AnnotationReport(
        meta,
        ref[z],
        sitk.GetArrayFromImage(annotation.labels)[z],
        int(ref.shape[0]),
        cache_key(ann_hash, spec.reference, spec.regions.get(spec.reference)),
    )


# ------------------------------------------------------------------------------------- reference ranking
def rank_dataset(spec: DatasetSpec, layout: DatasetLayout) -> pd.DataFrame:
    """Advisory medoid ranking of the ingested scans; each scan's features are computed once per content."""
    cache = ScanCache(layout.dir("reference_ranking"))
    manifest = read_manifest(layout)
    features = {}
    for scan_id in ok_scans(layout, manifest):
        key = cache_key(RANKING_VERSION, manifest.loc[scan_id, "source_hash"])
        info = cache.info(scan_id)
        if info is None or not cache.is_fresh(scan_id, key, []):
            info = {"features": scan_features(_array(layout.scan_image(scan_id)), spec.modality).tolist()}
            cache.record(scan_id, key, info)
        features[scan_id] = np.asarray(info["features"])
    cache.forget_others(set(features))
    ranking = rank_features(features)
    atomic_write_dataframe(ranking, layout.dir("reference_ranking") / "ranking.csv")
    return ranking


# ------------------------------------------------------------------------------------------ frame stacks
@dataclass
class FramesReport:
    frames_per_target: dict[str, int]
    computed: int


def build_frame_stacks(spec: DatasetSpec, layout: DatasetLayout) -> FramesReport:
    """Per target scan, the reference and target slices interleaved level by level from the annotated slice."""
    ann = read_annotation_meta(layout)
    cache = ScanCache(layout.dir("frame_stacks"))
    manifest = read_manifest(layout)
    reference = None
    n_frames, computed = {}, 0
    for scan_id in ok_scans(layout, manifest):
        folder = layout.frames(scan_id)
        key = cache_key(FRAMES_VERSION, manifest.loc[scan_id, "source_hash"], ann["annotation_sha256"])
        info = cache.info(scan_id)
        if info is None or not cache.is_fresh(scan_id, key, [folder / "frame_map.parquet"]):
            if reference is None:
                reference = frames_lib.normalise_for_frames(
                    _array(layout.scan_image(spec.reference)), spec.modality
                )
            target = frames_lib.normalise_for_frames(_array(layout.scan_image(scan_id)), spec.modality)
            sequences = frames_lib.build_frame_sequence(
                reference, target, ann["seed_slice"], ref_scan=spec.reference, tgt_scan=scan_id
            )
            maps = [frames_lib.write_frame_stack(seq, folder / d) for d, seq in sequences.items()]
            frame_map = pd.concat(maps, ignore_index=True)
            atomic_write_dataframe(frame_map, folder / "frame_map.parquet")
            info = {"n_frames": len(frame_map)}
            cache.record(scan_id, key, info)
            computed += 1
        n_frames[scan_id] = int(info["n_frames"])
    cache.forget_others(set(n_frames))
    return FramesReport(n_frames, computed)


# ------------------------------------------------------------------------------------- propagated masks
@dataclass
class PropagationReport:
    summary: pd.DataFrame  # one row per scan: confidence, empty slices, expert Dice, backend, mask digest
    computed: int
    rewritten: int

    @property
    def data_version(self) -> str:
        return cache_key(*self.summary.mask_sha256) if len(self.summary) else "empty"


def _mask_summary(
    scan_id: str, conf: pd.DataFrame, masks: np.ndarray, layout: DatasetLayout, n_classes: int
) -> dict:
    per_slice = conf.groupby("slice").agg(confidence=("confidence", "mean"), present=("present", "all"))
    expert_dice = float("nan")
    if layout.scan_expert(scan_id).exists():
        truth, pred = _array(layout.scan_expert(scan_id)), masks
        if n_classes == 4:
            truth, pred = merge_sides(truth), merge_sides(pred)
        expert_dice = float(np.mean(dice_per_class(pred, truth, 2)))
    return {
        "scan": scan_id,
        "mean_confidence": float(per_slice.confidence.mean()),
        "empty_slices": int((~per_slice.present).sum()),
        "expert_dice": expert_dice,
        "backend": str(conf.backend.iloc[0]),
        "model_id": str(conf.model_id.iloc[0]),
        "mask_sha256": sha256_file(layout.masks(scan_id)),
    }


def _differs(path: Path, arr: np.ndarray) -> bool:
    return not path.exists() or not np.array_equal(_array(path), arr)


def propagate_masks(
    spec: DatasetSpec, layout: DatasetLayout, build: Callable[[], Propagator], backend_id: str
) -> PropagationReport:
    """Masks per scan from the one annotated slice, with per-slice confidence; the propagator is built once,
    and only when some scan needs it."""
    ann = read_annotation_meta(layout)
    manifest = read_manifest(layout)
    cache = ScanCache(layout.dir("propagated_masks"))
    propagator, reference, annotation = None, None, None
    rows, computed, rewritten = [], 0, 0
    for scan_id in ok_scans(layout, manifest):
        key = cache_key(
            PROPAGATION_VERSION, manifest.loc[scan_id, "source_hash"], ann["annotation_sha256"], backend_id
        )
        info = cache.info(scan_id)
        if info is None or not cache.is_fresh(
            scan_id, key, [layout.masks(scan_id), layout.confidence(scan_id)]
        ):
            if propagator is None:
                propagator = build()
                reference = _read(layout.scan_image(spec.reference))
                annotation = _read(layout.annotation)
            target = _read(layout.scan_image(scan_id))
            result = propagator.propagate(reference, annotation, ann["seed_slice"], target, spec.modality)
            masks = result.masks.astype(np.uint8)
            if _differs(layout.masks(scan_id), masks):  # an identical result keeps its file (and digest)
                mask = sitk.GetImageFromArray(masks)
                mask.CopyInformation(target)
                atomic_write_image(mask, layout.masks(scan_id))
                rewritten += 1
            table = result.confidence.assign(scan=scan_id, backend=result.backend, model_id=result.model_id)
            atomic_write_dataframe(table, layout.confidence(scan_id))
            info = _mask_summary(scan_id, table, masks, layout, spec.n_classes)
            cache.record(scan_id, key, info)
            computed += 1
        rows.append(info)
    cache.forget_others({r["scan"] for r in rows})
    return PropagationReport(pd.DataFrame(rows), computed, rewritten)


def mask_digest(layout: DatasetLayout, scan_id: str) -> str:
    info = ScanCache(layout.dir("propagated_masks")).info(scan_id)
    return info["mask_sha256"] if info else sha256_file(layout.masks(scan_id))


# ----------------------------------------------------------------------------------------- pseudo-labels
@dataclass
class PseudoLabelReport:
    table: pd.DataFrame  # one row per slice of every scan, with eligible/kept
    per_scan: pd.DataFrame
    rewritten: int


SLICE_COLUMNS_ADDED = ("eligible", "kept")  # select_slices' columns, not part of a scan's slice table


def _slice_tables(
    spec: DatasetSpec, layout: DatasetLayout, cfg: SelectionConfig, digests: dict[str, str]
) -> list[pd.DataFrame]:
    """Every scan's slice table (confidence, plausibility, expert Dice per slice). A scan whose mask and
    table settings are unchanged takes its rows from the previous selection file (one read for all scans);
    only new or changed scans read their mask."""
    cache = ScanCache(layout.dir("pseudo_labels") / "slice_tables")
    previous = (
        pd.read_parquet(layout.pseudo_selection).drop(columns=list(SLICE_COLUMNS_ADDED), errors="ignore")
        if layout.pseudo_selection.exists()
        else pd.DataFrame(columns=["scan"])
    )
    by_scan = dict(tuple(previous.groupby("scan"))) if len(previous) else {}
    tables = []
    for scan_id, digest in digests.items():
        key = cache_key(PSEUDO_VERSION, digest, cfg.n_bands, cfg.area_ratio, cfg.smooth_direction)
        if scan_id in by_scan and cache.is_fresh(scan_id, key, []):
            tables.append(by_scan[scan_id].reset_index(drop=True))
            continue
        masks = _array(layout.masks(scan_id))
        conf = pd.read_parquet(layout.confidence(scan_id))
        table = slice_table(spec.name, scan_id, masks, conf, spec.n_classes, cfg)
        table["expert_dice"] = np.nan
        if layout.scan_expert(scan_id).exists():
            truth = _array(layout.scan_expert(scan_id))
            table["expert_dice"] = [
                float(np.mean(dice_per_class(masks[z], truth[z], spec.n_classes)))
                for z in range(masks.shape[0])
            ]
        cache.record(scan_id, key)  # the rows themselves are published with the selection file
        tables.append(table)
    return tables


def select_pseudo_labels(spec: DatasetSpec, layout: DatasetLayout, cfg: SelectionConfig) -> PseudoLabelReport:
    """Confident, plausible slices kept as labels; every other voxel is nnU-Net's ignore label (full size).

    The selection is dataset-wide (a new scan can change which slices of the others are kept), but only scans
    whose kept slices or mask changed are rewritten."""
    digests = {scan_id: mask_digest(layout, scan_id) for scan_id in ok_scans(layout)}
    tables = _slice_tables(spec, layout, cfg, digests)
    if not tables:
        return PseudoLabelReport(pd.DataFrame(), pd.DataFrame(), 0)
    table = select_slices(pd.concat(tables, ignore_index=True), cfg)
    cache = ScanCache(layout.dir("pseudo_labels"))
    rows, rewritten = [], 0
    for scan_id, group in table.groupby("scan"):
        kept = group.slice[group.kept].to_numpy()
        key = cache_key(PSEUDO_VERSION, digests[scan_id], spec.n_classes, *kept.tolist())
        if not cache.is_fresh(scan_id, key, [layout.pseudo_label(scan_id)]):
            masks_img = _read(layout.masks(scan_id))
            out = sitk.GetImageFromArray(
                pseudo_label_volume(sitk.GetArrayFromImage(masks_img), kept, spec.n_classes)
            )
            out.CopyInformation(masks_img)
            atomic_write_image(out, layout.pseudo_label(scan_id))
            cache.record(scan_id, key)
            rewritten += 1
        row = {"scan": scan_id, "n_slices": len(group), "n_kept": int(len(kept))}
        if group.expert_dice.notna().any():
            row["kept_slice_dice"] = (
                float(group.expert_dice[group.kept].mean()) if len(kept) else float("nan")
            )
            row["all_slice_dice"] = float(group.expert_dice.mean())
        rows.append(row)
    cache.forget_others(set(table.scan))
    ScanCache(layout.dir("pseudo_labels") / "slice_tables").forget_others(set(table.scan))
    atomic_write_dataframe(table, layout.pseudo_selection)
    return PseudoLabelReport(table, pd.DataFrame(rows), rewritten)
