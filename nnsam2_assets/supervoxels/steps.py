"""The ``supervoxels`` asset's per-dataset step, the sampling points the stage trainings take from it, and the
slice proposal of ``nnsam2 propose``.

Per scan, one slice is cut into segments: the reference's annotated slice, and each target's seed level (the
slice the propagation starts from). The cut is restricted to the propagated muscles plus a margin, so the
supervoxels describe the muscles and their borders, not the whole body. The segments are then carried through
the scan: by SAM2 (each segment a mask prompt, the propagation resource's model) or by the registration chain.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk

from nnsam2_assets.core import Log, silent
from nnsam2_assets.core.cache import ScanCache, cache_key
from nnsam2_assets.core.imaging import axial_axis, read_array, read_image, to_original_grid
from nnsam2_assets.core.intensities import registration_intensities
from nnsam2_assets.core.layout import DatasetLayout
from nnsam2_assets.core.storage import atomic_write_dataframe, atomic_write_image, sha256_file
from nnsam2_assets.ingest.annotation import read_annotation_meta
from nnsam2_assets.ingest.convention import DatasetSpec
from nnsam2_assets.ingest.scans import prepare_scan, read_manifest
from nnsam2_assets.propagation.base import Propagator, target_seed_slice
from nnsam2_assets.propagation.settings import PropagationConfig
from nnsam2_assets.propagation.slice_registration import carry_slice_labels
from nnsam2_assets.propagation.steps import mask_digest, propagated_scans
from nnsam2_assets.supervoxels import segments

VERSION = "supervoxels-v1"
# a supervoxel centres foreground patches when at least this share of it is muscle on a labelled slice
MIN_FOREGROUND_SHARE = 0.25

# (grey slice in [0, 1], pixel spacing (y, x), region or None for the body) -> segments 1..n
Segmenter = Callable[[np.ndarray, tuple[float, float], np.ndarray | None], np.ndarray]
# (scan, seed-slice segments, seed slice, modality) -> [Z, Y, X] supervoxels
Carrier = Callable[[sitk.Image, np.ndarray, int, str], np.ndarray]


@dataclass(frozen=True)
class SupervoxelMethod:
    name: str  # "slic" (weight-free) or "sam2"
    model_id: str  # what the supervoxels depend on besides the scan
    segment: Segmenter
    carry: Carrier


def slic_method() -> SupervoxelMethod:
    """Weight-free: SLIC on the slice, carried by the registration chain."""
    return SupervoxelMethod(
        "slic",
        f"slic-c{segments.SLIC_COMPACTNESS}-a{segments.SEGMENT_AREA_MM2:g}+chain",
        segments.slic_segments,
        carry_slice_labels,
    )


def sam2_method(generator, propagator: Propagator, model_id: str) -> SupervoxelMethod:
    """SAM2's automatic masks (``automatic.AutomaticMaskGenerator``) carried by the SAM2 propagator, each
    segment one object prompted by its mask. ``model_id`` is the propagator's identity."""

    def segment(grey: np.ndarray, spacing: tuple[float, float], within: np.ndarray | None) -> np.ndarray:
        return segments.paint_candidates(generator.generate(grey), grey.shape, within)

    def carry(scan: sitk.Image, labels: np.ndarray, seed: int, modality: str) -> np.ndarray:
        if (
            not labels.any()
        ):  # no mask passed the thresholds: no supervoxel, as the chain carries an empty cut
            return np.zeros(sitk.GetArrayViewFromImage(scan).shape, np.uint16)
        prompt = np.zeros(sitk.GetArrayViewFromImage(scan).shape, np.uint8)
        prompt[seed] = labels
        annotation = sitk.GetImageFromArray(prompt)
        annotation.CopyInformation(scan)
        volume = propagator.propagate(scan, annotation, seed, scan, modality).masks.astype(np.uint16)
        volume[seed] = labels  # the seed slice is the cut itself, as the registration chain keeps it
        return volume

    return SupervoxelMethod("sam2", f"{generator.model_id}+{model_id}", segment, carry)


def method_for(config: PropagationConfig) -> SupervoxelMethod:
    """SAM2's automatic masks carried by SAM2 when a checkpoint is configured, else SLIC carried by the
    registration chain. SAM2 is built once per call: the mask generator runs on the propagator's model."""
    if config.resolved_backend() != "sam2":
        return slic_method()
    from nnsam2_assets.supervoxels.automatic import AutomaticMaskGenerator

    propagator = config.build()
    generator = AutomaticMaskGenerator(
        config.sam2_config, config.sam2_checkpoint or None, config.sam2_image_size, config.device,
        model=propagator.predictor,
    )  # fmt: skip
    return sam2_method(generator, propagator, config.identity())


def method_id_for(config: PropagationConfig) -> str:
    """What the supervoxels depend on besides the data: SLIC and the chain, or SAM2's masks and model."""
    if config.resolved_backend() == "sam2":
        return f"sam2|{config.identity()}"
    return slic_method().model_id


def seed_segments(method: SupervoxelMethod, scan: sitk.Image, modality: str, z: int,
                  near: np.ndarray | None) -> np.ndarray:  # fmt: skip
    """Segments of slice ``z``: inside ``near`` grown by the region margin, or the body when there is none."""
    grey = registration_intensities(sitk.GetArrayViewFromImage(scan), modality)[z]
    spacing = (scan.GetSpacing()[1], scan.GetSpacing()[0])
    within = segments.region_around(near, spacing) if near is not None and near.any() else None
    return method.segment(grey, spacing, within)


@dataclass
class SupervoxelReport:
    summary: pd.DataFrame  # one row per scan
    computed: int
    model_id: str

    @property
    def data_version(self) -> str:
        return cache_key(VERSION, *self.summary.sha256) if len(self.summary) else "empty"


def build_supervoxels(
    spec: DatasetSpec, layout: DatasetLayout, method: Callable[[], SupervoxelMethod], method_id: str,
    log: Log = silent,
) -> SupervoxelReport:  # fmt: skip
    """Every ingested scan's supervoxels, from its seed level inside the propagated muscles. Incremental per
    scan: unchanged scan, propagated mask and method are neither recomputed nor read. ``method`` is built on
    the first scan that needs it."""
    seed_ref = int(read_annotation_meta(layout)["seed_slice"])
    manifest = read_manifest(layout)
    cache = ScanCache(layout.dir("supervoxels"))
    built = functools.cache(method)
    n_ref = functools.cache(lambda: read_image(layout.scan_image(spec.reference)).GetSize()[2])

    def compute(scan_id: str) -> dict:
        image = read_image(layout.scan_image(scan_id))
        n_tgt = image.GetSize()[2]
        seed = seed_ref if scan_id == spec.reference else int(target_seed_slice(seed_ref, n_ref(), n_tgt))
        muscles = read_array(layout.masks(scan_id))[seed] > 0
        chosen = built()
        seed_labels = seed_segments(chosen, image, spec.modality, seed, muscles)
        volume = chosen.carry(image, seed_labels, seed, spec.modality).astype(np.uint16)
        out = sitk.GetImageFromArray(volume)
        out.CopyInformation(image)
        atomic_write_image(out, layout.supervoxels(scan_id))
        log(f"{scan_id}: {int(seed_labels.max())} segments on slice {seed} carried through {n_tgt} slices")
        return {
            "scan": scan_id,
            "seed_slice": seed,
            "n_seed_segments": int(seed_labels.max()),
            "n_supervoxels": int(np.count_nonzero(np.unique(volume))),
            "covered_slices": int((volume.reshape(n_tgt, -1) > 0).any(1).sum()),
            "sha256": sha256_file(layout.supervoxels(scan_id)),
        }

    rows, computed = [], 0
    annotation = sha256_file(layout.annotation)  # the seed slices come from it
    for scan_id in propagated_scans(layout):  # a scan whose propagation failed has no mask to cut within
        key = cache_key(
            VERSION, manifest.loc[scan_id, "source_hash"], annotation, mask_digest(layout, scan_id), method_id
        )
        info, was = cache.get_or_compute(
            scan_id, key, [layout.supervoxels(scan_id)], lambda s=scan_id: compute(s)
        )
        rows.append(info)
        computed += was
    cache.forget_unseen()
    summary = pd.DataFrame(rows)
    atomic_write_dataframe(summary, layout.supervoxel_summary)
    return SupervoxelReport(summary, computed, method_id)


# --------------------------------------------------------------------------------- foreground sampling
# v2: each point is a pixel of the class it is filed under; in the stages' model versions
SAMPLING_VERSION = "points-v2"


def sampling_points(
    supervoxels: np.ndarray, labels: np.ndarray, ignore_label: int | None
) -> dict[int, np.ndarray]:
    """Patch centres for nnU-Net's foreground oversampling: one point per (supervoxel, labelled slice) that is at
    least ``MIN_FOREGROUND_SHARE`` muscle, for its most frequent class, at that class's pixel nearest the
    supervoxel's centre. Every supervoxel counts once however large, so small and border segments (where the
    errors are) are drawn as often as the bulk of a muscle.
    Returns {class id: [N, 3] (z, y, x) indices}."""
    points: dict[int, list[tuple[int, int, int]]] = {}
    for z in range(labels.shape[0]):
        lab, sv = labels[z], supervoxels[z]
        if ignore_label is not None and (lab == ignore_label).any():
            continue  # an ignored slice trains nothing; its patches would be wasted
        for segment in np.unique(sv[sv > 0]):
            ys, xs = np.nonzero(sv == segment)
            classes = np.bincount(lab[ys, xs].astype(np.int64))
            if len(classes) < 2 or classes[1:].sum() < MIN_FOREGROUND_SHARE * len(ys):
                continue
            majority = int(np.argmax(classes[1:])) + 1
            # nnU-Net takes a class's points for pixels of that class: the nearest pixel of the majority
            # class, not of any (a supervoxel a quarter muscle had filed a background pixel under it)
            own = lab[ys, xs] == majority
            cy, cx = ys.mean(), xs.mean()
            ys, xs = ys[own], xs[own]
            nearest = int(np.argmin((ys - cy) ** 2 + (xs - cx) ** 2))
            points.setdefault(majority, []).append((z, int(ys[nearest]), int(xs[nearest])))
    return {c: np.asarray(p, np.int64) for c, p in points.items()}


# --------------------------------------------------------------------------------- proposals
@dataclass(frozen=True)
class Proposal:
    path: Path  # label file on the reference's original grid, segments on one slice
    scan: str
    slice: int  # in the region crop, as annotation.json's seed_slice counts
    original_slice: int  # the same slice's axial index in the scan's own file (what a viewer shows)
    n_segments: int
    method: str


def propose_segments(
    spec: DatasetSpec, layout: DatasetLayout, method: SupervoxelMethod, z: int | None = None
) -> Proposal:
    """Candidate segments of one slice of the reference (the middle of its region unless ``z``), written as a
    label file on the scan's own grid to open over it in ITK-SNAP or 3D Slicer and relabel into the annotation.
    Needs no annotation and no pipeline run: the reference is read and cropped here."""
    prepared = prepare_scan(spec, spec.scans[spec.reference])
    image = prepared.image
    n_slices = image.GetSize()[2]
    z = n_slices // 2 if z is None else int(z)
    if not 0 <= z < n_slices:
        raise ValueError(
            f"{spec.scans[spec.reference].image}: slice {z} is outside the region's {n_slices} slices (0..{n_slices - 1})"
        )
    labels = seed_segments(method, image, spec.modality, z, near=None)
    volume = np.zeros(sitk.GetArrayViewFromImage(image).shape, np.uint8)
    volume[z] = labels
    canonical = sitk.GetImageFromArray(volume)
    canonical.CopyInformation(image)
    on_original = to_original_grid(canonical, read_image(spec.scans[spec.reference].image))
    path = layout.proposal(spec.reference, z)
    atomic_write_image(on_original, path)
    found = np.nonzero(sitk.GetArrayViewFromImage(on_original))
    axis = 2 - axial_axis(on_original)  # array axes run (k, j, i)
    original_slice = int(found[axis][0]) if len(found[0]) else -1
    return Proposal(path, spec.reference, z, original_slice, int(labels.max()), method.name)
