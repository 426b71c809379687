"""A seeded random walker on one slice (scikit-image), the one used wherever an edge is placed on the image:
the side edges of propagated and refined masks, and a slice mask made of click prompts."""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import numpy as np
from skimage.segmentation import random_walker


def walk(
    image: np.ndarray,
    seeds: np.ndarray,
    beta: float,
    within: np.ndarray,
    allowed: Mapping[int, np.ndarray] | None = None,
    spacing: tuple[float, float] | None = None,
) -> np.ndarray:
    """scikit-image's random walker on the box around ``within`` (plus one pixel; 0 outside it), answering
    in the seeds' own values: it numbers the seed values it was given 1..n, so a slice where one side has no
    seed would otherwise come back with the sides renamed.

    ``allowed`` maps a seed value to the pixels it may be given; elsewhere the pixel takes the likeliest of
    the other values. A value it does not name may be given anywhere. An ``image`` of shape (y, x, channels)
    is walked on all its channels together. ``spacing`` (rows, columns; None: square) scales each axis's
    intensity steps, so that rectangular pixels weigh an edge per mm alike along both."""
    ys, xs = np.nonzero(within)
    box = (
        slice(max(0, ys.min() - 1), min(image.shape[0], ys.max() + 2)),
        slice(max(0, xs.min() - 1), min(image.shape[1], xs.max() + 2)),
    )
    values = np.unique(seeds[box][seeds[box] > 0])
    with warnings.catch_warnings():
        # the conjugate-gradient solve stops at a relative tolerance of 1e-3, so a probability may end a
        # hair outside [0, 1]; only the argmax over the labels is used, and the warning reached the console
        # of every run
        warnings.filterwarnings("ignore", "The probability range is outside", UserWarning)
        probabilities = random_walker(
            image[box], seeds[box], beta=beta, mode="cg_j", return_full_prob=True,
            channel_axis=-1 if image.ndim == 3 else None, spacing=spacing,
        )  # fmt: skip
    for i, value in enumerate(values):
        if allowed is not None and value in allowed:
            probabilities[i][~allowed[value][box]] = -np.inf
    out = np.zeros(seeds.shape, seeds.dtype)
    out[box] = values[np.argmax(probabilities, axis=0)]
    return out
