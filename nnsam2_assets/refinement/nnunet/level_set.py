"""nnSAM's shape head: each class as a level set (signed distance), regressed beside the segmentation.

The convention is the level-set one: the distance is negative inside the object and positive outside, so the
zero level is the boundary and the curvature of a disc of radius r is +1/r on its rim. The head regresses
``tanh(phi / TAU_PX)``: bounded, exact near the boundary where it matters, saturated far from it. A monotone
map keeps every level line, so the curvature of the regressed map equals that of the distance itself.

The loss is the regression error plus a curvature term on a band around the true boundary: the head is told
how bent the boundary is, the shape prior that carries over from a few labelled slices to unseen ones.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

# distance scale of the regressed map, in pixels of the network's grid (2 mm pixels in the quick profile)
TAU_PX = 8.0
# the curvature term counts within this many pixels of the true boundary
BAND_PX = 3.0
# |curvature| is clipped here (1/px): a corner of a pixel mask has a curvature of the order of 1
CURVATURE_CLIP = 1.0
CURVATURE_WEIGHT = 0.1
# a pixel mask's boundary is a staircase whose own curvature is of the order of 1/px; both maps are smoothed
# this much (px) before their curvature is compared, so the term sees the shape and not the pixel grid
CURVATURE_SMOOTHING_PX = 1.5
_EPS = 1e-6


def signed_distance(mask: np.ndarray, spacing: tuple[float, ...] | None = None) -> np.ndarray:
    """Signed Euclidean distance of a boolean mask: negative inside, positive outside, per pixel centre.

    An empty mask is outside everywhere (+inf would break the regression; the largest finite distance of the
    grid stands in for it); a full mask is inside everywhere, likewise.
    """
    mask = np.asarray(mask, dtype=bool)
    far = float(np.linalg.norm(np.multiply(mask.shape, spacing or 1.0)))
    if not mask.any():
        return np.full(mask.shape, far, np.float32)
    if mask.all():
        return np.full(mask.shape, -far, np.float32)
    outside = ndimage.distance_transform_edt(~mask, sampling=spacing)
    inside = ndimage.distance_transform_edt(mask, sampling=spacing)
    # half a pixel either side puts the zero level between the last inside and first outside pixel centres
    return np.where(mask, 0.5 - inside, outside - 0.5).astype(np.float32)


def curvature(phi: torch.Tensor) -> torch.Tensor:
    """Mean curvature div(grad phi / |grad phi|) of each [..., H, W] map, by central differences (1/px)."""
    py, px = torch.gradient(phi, dim=(-2, -1))
    pyy, pyx = torch.gradient(py, dim=(-2, -1))
    _, pxx = torch.gradient(px, dim=(-2, -1))
    numerator = pxx * py**2 - 2 * px * py * pyx + pyy * px**2
    return numerator / (px**2 + py**2 + _EPS) ** 1.5


def smoothed(maps: torch.Tensor, sigma: float = CURVATURE_SMOOTHING_PX) -> torch.Tensor:
    """Gaussian smoothing of each [..., H, W] map in plane (edges replicated)."""
    radius = max(1, int(round(3 * sigma)))
    offsets = torch.arange(-radius, radius + 1, dtype=maps.dtype, device=maps.device)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    shape = maps.shape
    x = maps.reshape(-1, 1, *shape[-2:])
    x = torch.nn.functional.pad(x, (radius, radius, radius, radius), mode="replicate")
    x = torch.nn.functional.conv2d(x, kernel.view(1, 1, 1, -1))
    x = torch.nn.functional.conv2d(x, kernel.view(1, 1, -1, 1))
    return x.reshape(shape)


def level_set_targets(
    seg: torch.Tensor, foreground: list[int], ignore_label: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, 1, H, W] labels -> (targets [B, K, H, W] = tanh(phi / TAU_PX) per foreground class, usable [B]).

    A sample with any ignored pixel is not usable: its distances would run through unlabelled tissue (in the
    sparse pseudo-labels a slice is either labelled or ignored as a whole).
    """
    labels = seg[:, 0].detach().cpu().numpy()
    targets = np.zeros((labels.shape[0], len(foreground), *labels.shape[1:]), np.float32)
    usable = np.ones(labels.shape[0], bool)
    for b, sample in enumerate(labels):
        if ignore_label is not None and (sample == ignore_label).any():
            usable[b] = False
            continue
        for k, label in enumerate(foreground):
            targets[b, k] = np.tanh(signed_distance(sample == label) / TAU_PX)
    return torch.from_numpy(targets).to(seg.device), torch.from_numpy(usable).to(seg.device)


def level_set_loss(predicted: torch.Tensor, target: torch.Tensor, usable: torch.Tensor) -> torch.Tensor:
    """Regression error of the regressed maps plus the curvature error on the band round the true boundary.

    ``predicted`` and ``target`` are [B, K, H, W] in (-1, 1); only ``usable`` samples count. Zero when no sample
    is usable, so a batch of ignored slices trains the segmentation alone.
    """
    if not bool(usable.any()):
        return predicted.sum() * 0.0
    predicted, target = predicted[usable], target[usable]
    regression = torch.mean((predicted - target) ** 2)
    band = target.abs() < np.tanh(BAND_PX / TAU_PX)
    if not bool(band.any()):
        return regression
    bend_pred = curvature(smoothed(predicted)).clamp(-CURVATURE_CLIP, CURVATURE_CLIP)
    bend_true = curvature(smoothed(target)).clamp(-CURVATURE_CLIP, CURVATURE_CLIP)
    return regression + CURVATURE_WEIGHT * (bend_pred - bend_true).abs()[band].mean()
