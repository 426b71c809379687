"""Small overlay PNGs for asset metadata (kept tiny: metadata lives in Dagster's event log)."""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image

# right side warm, left side cool, nnU-Net's ignore label grey; ES darker than MF so 4-class maps stay
# readable. Per class count: drawn with the 4-class colours, a 2-class left side (id 2) came out the right
# multifidus' orange and the 2-class ignore label (3) the left multifidus' cyan
_COLOURS = {
    4: {1: (230, 60, 40), 2: (250, 170, 40), 3: (60, 200, 230), 4: (40, 80, 230), 5: (160, 160, 160)},
    2: {1: (230, 60, 40), 2: (40, 80, 230), 3: (160, 160, 160)},
}


def to_uint8(slice2d: np.ndarray, lo_pct: float = 0.5, hi_pct: float = 99.5) -> np.ndarray:
    lo, hi = np.percentile(slice2d, [lo_pct, hi_pct])
    if hi <= lo:
        hi = lo + 1.0
    return (np.clip((slice2d - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)


def overlay_rgb(
    image2d: np.ndarray, labels2d: np.ndarray | None, n_classes: int = 4, alpha: float = 0.45
) -> np.ndarray:
    grey = to_uint8(np.asarray(image2d, dtype=np.float32))
    rgb = np.stack([grey] * 3, axis=-1).astype(np.float32)
    if labels2d is not None:
        for value, colour in _COLOURS[n_classes].items():
            m = labels2d == value
            rgb[m] = (1 - alpha) * rgb[m] + alpha * np.array(colour, dtype=np.float32)
    # canonical arrays are [y, x] with y growing posterior and x growing to the patient's left, so row 0 is
    # anterior and column 0 the patient's right: drawn as stored, the slice reads like a radiology axial
    # view (anterior up, the patient's right on the viewer's left). Neither axis is flipped.
    return rgb.astype(np.uint8)


def png_bytes(rgb: np.ndarray, max_size: int = 256) -> bytes:
    img = Image.fromarray(rgb)
    img.thumbnail((max_size, max_size))
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def overlay_png(
    image2d: np.ndarray, labels2d: np.ndarray | None, n_classes: int = 4, max_size: int = 256
) -> bytes:
    return png_bytes(overlay_rgb(image2d, labels2d, n_classes), max_size)


def montage_png(
    volume: np.ndarray,
    labels: np.ndarray | None,
    n_classes: int = 4,
    slices: list[int] | None = None,
    tile: int = 160,
) -> bytes:
    """A row of overlays at a few slice levels (default: bottom, middle, top)."""
    n = volume.shape[0]
    slices = slices if slices is not None else sorted({0, n // 2, n - 1})
    tiles = []
    for z in slices:
        rgb = overlay_rgb(volume[z], None if labels is None else labels[z], n_classes)
        im = Image.fromarray(rgb)
        im.thumbnail((tile, tile))
        tiles.append(np.asarray(im))
    h = max(t.shape[0] for t in tiles)
    padded = [np.pad(t, ((0, h - t.shape[0]), (0, 2), (0, 0))) for t in tiles]
    return png_bytes(np.concatenate(padded, axis=1), max_size=tile * len(tiles) + 8)


_LINE_COLOURS = ((230, 60, 40), (250, 200, 40), (60, 200, 230))


def sagittal_lines_png(
    volume: np.ndarray, spacing_zyx: tuple[float, float, float], lines: list[int], height: int = 200
) -> bytes:
    """The mid-sagittal reformat of a canonical volume [z, y, x] (z up, so drawn flipped) with a horizontal
    line at each of ``lines`` (canonical z indices), stretched to true proportions."""
    sag = to_uint8(volume[:, :, volume.shape[2] // 2])
    rgb = np.repeat(sag[:, :, None], 3, axis=2)
    for colour, z in zip(_LINE_COLOURS * 3, lines, strict=False):
        if 0 <= z < rgb.shape[0]:
            rgb[z] = colour
    rgb = rgb[::-1]
    im = Image.fromarray(rgb)
    rows, cols = rgb.shape[:2]
    im = im.resize((max(int(round(cols * spacing_zyx[1] * height / (rows * spacing_zyx[0]))), 1), height))
    return png_bytes(np.asarray(im), max_size=height)


def markdown_image(png: bytes, alt: str = "overlay") -> str:
    return f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode()})"
