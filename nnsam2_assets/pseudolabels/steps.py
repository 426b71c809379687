"""The ``pseudo_labels`` asset's per-dataset step: confident, plausible slices of the propagated masks kept as
labels, every other voxel nnU-Net's ignore label (full-size volumes)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import SimpleITK as sitk

from nnsam2_assets.core.cache import ScanCache, cache_key
from nnsam2_assets.core.imaging import read_array, read_image
from nnsam2_assets.core.labels import mean_dice, unannotated_classes
from nnsam2_assets.core.layout import DatasetLayout
from nnsam2_assets.core.storage import atomic_write_dataframe, atomic_write_image, sha256_file
from nnsam2_assets.ingest.convention import DatasetSpec
from nnsam2_assets.propagation.steps import mask_digest, propagated_scans
from nnsam2_assets.pseudolabels.selection import (
    SelectionConfig,
    pseudo_label_volume,
    select_slices,
    slice_table,
)

VERSION = "pseudo-v2"


@dataclass
class PseudoLabelReport:
    table: pd.DataFrame  # one row per slice of every scan, with eligible/kept
    per_scan: pd.DataFrame
    rewritten: int
    # each scan's pseudo-label key (its mask and kept slices)
    keys: dict[str, str] = field(default_factory=dict)

    @property
    def data_version(self) -> str:
        """What the stages read: each scan's pseudo-label file, so a run with other thresholds that keeps
        other slices is a change downstream, and one that keeps the same slices is not."""
        return (
            cache_key(*sorted(f"{scan}:{key}" for scan, key in self.keys.items())) if self.keys else "empty"
        )


SLICE_COLUMNS_ADDED = ("eligible", "kept")  # select_slices' columns, not part of a scan's slice table


def _slice_tables(
    spec: DatasetSpec, layout: DatasetLayout, cfg: SelectionConfig, digests: dict[str, str]
) -> tuple[list[pd.DataFrame], dict[str, str]]:
    """Every scan's slice table (confidence, plausibility, expert Dice per slice), and the keys of the tables
    computed anew, to record once the selection file holds their rows. A scan whose mask and table settings
    are unchanged takes its rows from the previous selection file (one read for all scans); only new or
    changed scans read their mask."""
    cache = ScanCache(layout.slice_tables)
    previous = (
        pd.read_parquet(layout.pseudo_selection).drop(columns=list(SLICE_COLUMNS_ADDED), errors="ignore")
        if layout.pseudo_selection.exists()
        else pd.DataFrame(columns=["scan"])
    )
    by_scan = dict(tuple(previous.groupby("scan"))) if len(previous) else {}
    tables, computed = [], {}
    for scan_id, digest in digests.items():
        # the rows read the mask, its confidence table and the expert labels (per-slice expert Dice)
        expert = layout.scan_expert(scan_id)
        key = cache_key(
            VERSION,
            digest,
            sha256_file(layout.confidence(scan_id)),
            sha256_file(expert) if expert.exists() else "",
            cfg.n_bands,
            cfg.area_ratio,
            cfg.smooth_direction,
        )
        if scan_id in by_scan and cache.is_fresh(scan_id, key, []):
            tables.append(by_scan[scan_id].reset_index(drop=True))
            continue
        masks = read_array(layout.masks(scan_id))
        conf = pd.read_parquet(layout.confidence(scan_id))
        table = slice_table(spec.name, scan_id, masks, conf, spec.n_classes, cfg)
        table["expert_dice"] = np.nan
        if layout.scan_expert(scan_id).exists():
            truth = read_array(layout.scan_expert(scan_id))
            skip = unannotated_classes(truth, spec.n_classes)[
                spec.n_classes
            ]  # not drawn: unknown, not absent
            table["expert_dice"] = [
                mean_dice(masks[z], truth[z], spec.n_classes, skip) for z in range(masks.shape[0])
            ]
        # recorded only after the selection file is written: a run dying in between must not leave the
        # new key beside the old rows, which a later run would take as this table
        cache.invalidate(scan_id)
        computed[scan_id] = key
        tables.append(table)
    return tables, computed


def select_pseudo_labels(spec: DatasetSpec, layout: DatasetLayout, cfg: SelectionConfig) -> PseudoLabelReport:
    """Confident, plausible slices kept as labels; every other voxel is nnU-Net's ignore label (full size).

    The selection is dataset-wide (a new scan can change which slices of the others are kept), but only scans
    whose kept slices or mask changed are rewritten."""
    digests = {scan_id: mask_digest(layout, scan_id) for scan_id in propagated_scans(layout)}
    tables, table_keys = _slice_tables(spec, layout, cfg, digests)
    if not tables:
        return PseudoLabelReport(pd.DataFrame(), pd.DataFrame(), 0)
    table = select_slices(pd.concat(tables, ignore_index=True), cfg)
    cache = ScanCache(layout.dir("pseudo_labels"))
    rows, rewritten, keys = [], 0, {}
    for scan_id, group in table.groupby("scan"):
        kept = group.slice[group.kept].to_numpy()
        key = keys[scan_id] = cache_key(VERSION, digests[scan_id], spec.n_classes, *kept.tolist())
        if not cache.is_fresh(scan_id, key, [layout.pseudo_label(scan_id)]):
            cache.invalidate(scan_id)
            masks_img = read_image(layout.masks(scan_id))
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
    slice_tables = ScanCache(layout.slice_tables)
    slice_tables.forget_others(set(table.scan))
    atomic_write_dataframe(table, layout.pseudo_selection)
    for scan_id, key in table_keys.items():
        slice_tables.record(scan_id, key)
    return PseudoLabelReport(table, pd.DataFrame(rows), rewritten, keys)
