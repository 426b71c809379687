"""A scan's intensities on a common scale of about [0, 1], for registration metrics and random walkers: CT
windowed in HU, MRI between robust percentiles of its foreground."""

from __future__ import annotations

import numpy as np

# HU: soft tissue and bone edges, without air/metal extremes dominating the metric
CT_WINDOW = (-200.0, 300.0)


def registration_intensities(arr: np.ndarray, modality: str) -> np.ndarray:
    """Float32 copy scaled to ~[0, 1] for the metrics: CT windowed in HU, MRI robust percentiles."""
    a = np.asarray(arr, dtype=np.float32)
    if modality.lower() == "ct":
        lo, hi = CT_WINDOW
    else:
        # the foreground lies above the image's floor: 0 for a magnitude image, its minimum for one stored
        # shifted or z-scored (where "above 0" had left out the muscle, or every voxel)
        fg = a[a > min(float(a.min()), 0.0)]
        if fg.size < 16:
            return np.zeros_like(a)
        lo, hi = (float(v) for v in np.percentile(fg, [0.5, 99.5]))
    if hi <= lo:
        return np.zeros_like(a)
    return np.clip((a - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)
