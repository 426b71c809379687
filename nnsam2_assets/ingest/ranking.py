"""Advisory choice of the reference scan: the medoid of weight-free image features.

nnsam2 picks the scan whose DINOv2 embedding (mean of the top, middle and bottom slice) is closest on
average to all others. DINOv2 weights cannot be downloaded here, so each slice is described instead by a
normalised low-resolution thumbnail plus a gradient-orientation histogram; both are weight-free and capture
the size, position and shape of the muscles, which is what makes a reference easy to propagate from.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import ndimage

from nnsam2_assets.core.cache import ScanCache, cache_key
from nnsam2_assets.core.imaging import read_array
from nnsam2_assets.core.layout import DatasetLayout
from nnsam2_assets.core.storage import atomic_write_dataframe
from nnsam2_assets.ingest.convention import DatasetSpec
from nnsam2_assets.ingest.scans import ok_scans, read_manifest

VERSION = "ranking-v1"
THUMB = 24


def _normalise(vol: np.ndarray, modality: str) -> np.ndarray:
    if modality == "ct":
        return np.clip((vol + 30.0) / 180.0, 0, 1)
    lo, hi = np.percentile(vol, [0.5, 99.5])
    return np.clip((vol - lo) / max(hi - lo, 1e-6), 0, 1)


def slice_features(slice2d: np.ndarray) -> np.ndarray:
    zoom = (THUMB / slice2d.shape[0], THUMB / slice2d.shape[1])
    thumb = ndimage.zoom(slice2d, zoom, order=1)
    gy, gx = np.gradient(ndimage.gaussian_filter(slice2d, 1.0))
    mag = np.hypot(gx, gy)
    angle = np.mod(np.arctan2(gy, gx), np.pi)
    hist, _ = np.histogram(angle, bins=9, range=(0, np.pi), weights=mag)
    hist = hist / (hist.sum() + 1e-9)
    thumb = (thumb - thumb.mean()) / (thumb.std() + 1e-6)
    return np.concatenate([thumb.ravel() / np.sqrt(thumb.size), hist])


def scan_features(volume: np.ndarray, modality: str) -> np.ndarray:
    vol = _normalise(volume.astype(np.float32), modality)
    n = vol.shape[0]
    return np.mean([slice_features(vol[z]) for z in (0, n // 2, n - 1)], axis=0)


def rank_references(volumes: dict[str, np.ndarray], modality: str) -> pd.DataFrame:
    """Rank scans by mean cosine distance to all others (rank 1 = the medoid = the suggested reference)."""
    return rank_features({s: scan_features(v, modality) for s, v in volumes.items()})


def rank_features(features: dict[str, np.ndarray]) -> pd.DataFrame:
    """``rank_references`` on precomputed per-scan features (lets callers cache them per scan)."""
    ids = list(features)
    if not ids:
        return pd.DataFrame(columns=["scan", "rank", "mean_distance"])
    feats = np.stack([np.asarray(features[s], dtype=float) for s in ids])
    unit = feats / (np.linalg.norm(feats, axis=1, keepdims=True) + 1e-12)
    dist = 1.0 - unit @ unit.T
    mean = dist.sum(1) / max(len(ids) - 1, 1)
    order = np.argsort(mean, kind="stable")
    return pd.DataFrame(
        {"scan": [ids[i] for i in order], "rank": np.arange(1, len(ids) + 1), "mean_distance": mean[order]}
    )


def reference_standing(ranking: pd.DataFrame, reference: str) -> tuple[int, bool]:
    """The reference's rank (-1 when it is not among the ranked scans) and whether it is representative:
    in the better half of its cohort. Propagation from an outlying scan degrades every target, so a
    reference in the worse half is worth a second look (not an error: the annotation stays the user's)."""
    hits = np.flatnonzero(ranking["scan"].to_numpy() == reference)
    if not hits.size:
        return -1, False
    rank = int(hits[0]) + 1
    return rank, rank <= max(1, int(np.ceil(len(ranking) / 2)))


def rank_dataset(spec: DatasetSpec, layout: DatasetLayout) -> pd.DataFrame:
    """Advisory medoid ranking of the ingested scans; each scan's features are computed once per content."""
    cache = ScanCache(layout.dir("reference_ranking"))
    manifest = read_manifest(layout)
    features = {}
    for scan_id in ok_scans(layout, manifest):
        info, _ = cache.get_or_compute(
            scan_id,
            cache_key(VERSION, manifest.loc[scan_id, "source_hash"]),
            [],
            lambda scan_id=scan_id: {
                "features": scan_features(read_array(layout.scan_image(scan_id)), spec.modality).tolist()
            },
        )
        features[scan_id] = np.asarray(info["features"])
    cache.forget_unseen()
    ranking = rank_features(features)
    atomic_write_dataframe(ranking, layout.ranking)
    return ranking
