"""The ``propagated_masks`` asset's per-dataset step: every ingested scan's masks from the annotated slice(s),
with a per-slice confidence table. Incremental per scan (``core.cache``): a scan whose content, annotation
and backend are unchanged is neither propagated nor read again."""

from __future__ import annotations

import functools
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk

from nnsam2_assets.core.cache import ScanCache, cache_key
from nnsam2_assets.core.imaging import read_array, read_header, read_image, same_grid
from nnsam2_assets.core.labels import mean_dice, to_class_space, unannotated_classes
from nnsam2_assets.core.layout import DatasetLayout
from nnsam2_assets.core.storage import (
    StorageError,
    atomic_write_dataframe,
    atomic_write_image,
    remove_outputs,
    sha256_file,
)
from nnsam2_assets.ingest.annotation import (
    annotated_slices,
    read_annotation_clicks,
    read_annotation_meta,
)
from nnsam2_assets.ingest.convention import DatasetSpec
from nnsam2_assets.ingest.scans import ok_scans, read_manifest
from nnsam2_assets.propagation.base import PropagationResult, Propagator
from nnsam2_assets.propagation.boundary import band_key
from nnsam2_assets.propagation.parallel import propagate_in_workers
from nnsam2_assets.propagation.prompts import propagate_from_slices

# v2: every annotated slice a prompt; v3: a side's edge moves no further than the band from its own edge;
# v4: SAM2 keeps the reference's annotated slice exactly (registration masks are unchanged, and so are the
# digests downstream assets key on: only SAM2 references recompute further)
VERSION = "propagation-v4"


# what one scan's propagation may raise (SimpleITK's RuntimeError, a CUDA out-of-memory, a value a reader
# refuses): that scan fails alone. A failed write is the storage's (``StorageError``) and fails the step
SCAN_ERRORS = (RuntimeError, ValueError, MemoryError)


@dataclass
class PropagationReport:
    summary: pd.DataFrame  # one row per scan: confidence, empty slices, expert Dice, backend, mask digest
    computed: int
    rewritten: int
    workers: int = 1  # processes that propagated this run's scans
    failed: dict[str, str] = field(default_factory=dict)  # scan -> why it has no mask this run

    @property
    def data_version(self) -> str:
        """The masks and their confidence tables: pseudo-label selection ranks slices by confidence, so new
        confidences on the same masks are a change for it (a summary cached before lacks their digest)."""
        if not len(self.summary):
            return "empty"
        confidences = self.summary.get("confidence_sha256", pd.Series(dtype=object)).fillna("")
        return cache_key(*self.summary.mask_sha256, *confidences)


def _band_key(scan_image: Path) -> str:
    """The edge band's part of a scan's mask key, from the crop's header (``boundary.band_key``)."""
    try:
        spacing = read_header(scan_image).GetSpacing()
    except RuntimeError:  # an unreadable crop fails its own propagation, naming the file: its key is moot
        return ""
    return band_key(spacing)


def _mask_summary(
    scan_id: str, conf: pd.DataFrame, masks: np.ndarray, layout: DatasetLayout, n_classes: int
) -> dict:
    per_slice = conf.groupby("slice").agg(confidence=("confidence", "mean"), present=("present", "all"))
    expert_dice = float("nan")
    if layout.scan_expert(scan_id).exists():
        expert = read_array(layout.scan_expert(scan_id))
        skip = unannotated_classes(expert, n_classes)[2]  # a side the expert left out is unknown, not absent
        expert_dice = mean_dice(
            to_class_space(masks, n_classes, 2), to_class_space(expert, n_classes, 2), 2, skip
        )
    return {
        "scan": scan_id,
        "mean_confidence": float(per_slice.confidence.mean()),
        "empty_slices": int((~per_slice.present).sum()),
        "expert_dice": expert_dice,
        "backend": str(conf.backend.iloc[0]),
        "model_id": str(conf.model_id.iloc[0]),
        "mask_sha256": sha256_file(layout.masks(scan_id)),
        "confidence_sha256": sha256_file(layout.confidence(scan_id)),
    }


def _differs(path: Path, arr: np.ndarray, target: sitk.Image) -> bool:
    """Whether the stored mask must be rewritten: other voxels, or the same voxels on another grid (a scan
    whose origin or spacing changed propagates slice by slice to the same array)."""
    if not path.exists():
        return True
    stored = read_image(path)
    return not np.array_equal(sitk.GetArrayViewFromImage(stored), arr) or not same_grid(stored, target)


def propagate_masks(
    spec: DatasetSpec,
    layout: DatasetLayout,
    build: Callable[[], Propagator],
    backend_id: str,
    workers: int = 1,
) -> PropagationReport:
    """Masks per scan from the annotated slice(s), each target slice from the nearest, with per-slice confidence; the propagator is built once,
    and only when some scan needs it. A backend that works on frames (SAM2) keeps them under
    ``layout.frames(scan)``, so the frames it tracked are the frames a user finds. With ``workers`` > 1 a
    ``parallel_safe`` backend propagates the scans that need it in that many processes (same masks)."""
    ann = read_annotation_meta(layout)
    manifest = read_manifest(layout)
    cache = ScanCache(layout.dir("propagated_masks"))
    rewritten = 0

    clicks = read_annotation_clicks(layout)
    prompts = annotated_slices(ann)
    # what is propagated: the canonical annotation (for clicks, the mask made of them) and the clicks
    annotation_digest = sha256_file(layout.annotation)
    # every target is registered to (or tracked from) the reference's image: its content is an input of all
    reference_digest = sha256_file(layout.scan_image(spec.reference))
    clicks_digest = sha256_file(layout.annotation_clicks) if clicks else ""

    @functools.cache
    def shared() -> tuple[Propagator, sitk.Image, sitk.Image]:
        """Built on the first scan that needs propagating, then reused for every other."""
        return build(), read_image(layout.scan_image(spec.reference)), read_image(layout.annotation)

    def propagate(scan_id: str) -> dict:
        nonlocal rewritten
        # frames of an earlier run (another backend, or prompts on other slices) must not stand beside masks
        # they did not make
        shutil.rmtree(layout.frames(scan_id), ignore_errors=True)
        target = read_image(layout.scan_image(scan_id))
        result = done.pop(scan_id, None)
        if result is None:
            propagator, reference, annotation = shared()
            result = propagate_from_slices(
                propagator,
                reference,
                annotation,
                prompts,
                target,
                spec.modality,
                frames_dir=layout.frames(scan_id),
                clicks=clicks,
            )
        masks = result.masks.astype(np.uint8)
        if _differs(layout.masks(scan_id), masks, target):  # an identical result keeps its file (and digest)
            mask = sitk.GetImageFromArray(masks)
            mask.CopyInformation(target)
            atomic_write_image(mask, layout.masks(scan_id))
            rewritten += 1
        table = result.confidence.assign(scan=scan_id, backend=result.backend, model_id=result.model_id)
        atomic_write_dataframe(table, layout.confidence(scan_id))
        return _mask_summary(scan_id, table, masks, layout, spec.n_classes)

    def key_and_outputs(scan_id: str) -> tuple[str, list[Path]]:
        key = cache_key(
            VERSION,
            manifest.loc[scan_id, "source_hash"],
            reference_digest,
            annotation_digest,
            clicks_digest,
            backend_id,
            _band_key(layout.scan_image(scan_id)),
        )
        return key, [layout.masks(scan_id), layout.confidence(scan_id)]

    scans = ok_scans(layout, manifest)
    stale = [s for s in scans if not cache.is_fresh(s, *key_and_outputs(s))]
    for scan_id in stale:
        cache.invalidate(scan_id)
    done: dict[str, PropagationResult] = {}
    n_workers = 1
    if workers > 1 and len(stale) > 1:
        propagator = shared()[0]
        if propagator.parallel_safe:
            n_workers = min(workers, len(stale))
            done = propagate_in_workers(
                propagator,
                layout.scan_image(spec.reference),
                layout.annotation,
                prompts,
                spec.modality,
                {s: layout.scan_image(s) for s in stale},
                n_workers,
            )

    rows, computed, failed = [], 0, {}
    for scan_id in scans:
        key, outputs = key_and_outputs(scan_id)
        try:
            info, was_computed = cache.get_or_compute(scan_id, key, outputs, lambda s=scan_id: propagate(s))
        except SCAN_ERRORS as exc:
            if isinstance(exc, StorageError):
                raise
            # this scan has no mask this run: no earlier mask, label, final mask or row may stand for it
            remove_outputs(layout.propagation_outputs(scan_id))
            failed[scan_id] = f"{type(exc).__name__}: {exc}"
            continue
        rows.append(info)
        computed += was_computed
    cache.forget_unseen()
    if failed and not rows:
        raise RuntimeError(f"no scan of {spec.name} could be propagated: {failed}")
    return PropagationReport(pd.DataFrame(rows), computed, rewritten, n_workers, failed)


def propagated_scans(layout: DatasetLayout) -> list[str]:
    """The scans that passed ingest and have a propagated mask: one whose propagation failed has none."""
    return [scan for scan in ok_scans(layout) if layout.masks(scan).exists()]


def mask_digest(layout: DatasetLayout, scan_id: str) -> str:
    info = ScanCache(layout.dir("propagated_masks")).info(scan_id)
    return info["mask_sha256"] if info else sha256_file(layout.masks(scan_id))
