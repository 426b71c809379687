"""Turn a reference and a target volume into the interleaved 2-D "video" that the SAM2 video predictor tracks.

Why interleave (docs/method.md, "Frames and interleaving"): SAM2 carries an object from frame to frame through its memory bank. Putting a
reference slice next to the target slice of the same relative level makes every "frame-to-frame motion" a small
inter-subject change at matching anatomy; the reference's own slices form a coherent track down the volume.

Deviations from the published notebooks, on purpose:
- Layers are aligned on the SEED level (reference slice ``s+k`` next to target slice ``t+k``, with
  ``t = target_seed_slice(s, n_ref, n_tgt)``) and we build one sequence PER DIRECTION (superior = +z, inferior
  = -z), each starting with the prompted reference seed frame. The notebooks aligned from the top slice only.
- JPEG quality 95 at native in-plane size (the notebooks used quality 75 at 256x256).
- In-plane size: when the reference and target slices have different in-plane shapes, BOTH stacks are resized
  (bilinear, aspect ratio NOT preserved) to one common square ``S x S`` with ``S = max(all in-plane dims)``.
  SAM2 needs one frame size per video (it reports masks at the first frame's size) and it stretches every frame
  to its own square ``image_size`` anyway, so stretching to a square first loses nothing extra; masks are
  mapped back to each scan's own grid by the caller (resizing logits, then thresholding). When the shapes are
  equal, frames keep their native (possibly non-square) size.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from nnsam2_assets.core.storage import atomic_write_bytes, atomic_write_dataframe
from nnsam2_assets.propagation.base import target_seed_slice

JPEG_QUALITY = 95
FRAME_MAP_COLUMNS = ["frame_idx", "direction", "scan", "slice", "role", "prompted"]
FRAME_MAP_FILE = "frame_map.parquet"
DIRECTIONS = ("superior", "inferior")

CT_WINDOW = (-30.0, 150.0)  # HU window of the reference notebooks (muscle + fat contrast)
MRI_PERCENTILES = (0.5, 99.5)


def normalise_for_frames(arr: np.ndarray, modality: str) -> np.ndarray:
    """Map a volume (original units) to uint8 grey levels, as the reference notebooks do.

    CT: window [-30, 150] HU -> 0..255. MRI: per-volume 0.5-99.5 percentiles -> 0..255. Values are truncated
    (``astype(uint8)`` after scaling), matching the reference, so identical inputs give identical JPEGs.
    """
    x = np.asarray(arr, dtype=np.float64)
    modality = modality.lower()
    if modality == "ct":
        lo, hi = CT_WINDOW
    elif modality == "mri":
        finite = x[np.isfinite(x)]
        if finite.size == 0:
            return np.zeros(x.shape, dtype=np.uint8)
        lo, hi = (float(v) for v in np.percentile(finite, MRI_PERCENTILES))
    else:
        raise ValueError(f"unknown modality {modality!r}: expected 'mri' or 'ct'")
    if not hi > lo:  # constant volume: no contrast to stretch
        return np.zeros(x.shape, dtype=np.uint8)
    x = np.nan_to_num(x, nan=lo, posinf=hi, neginf=lo)
    scaled = (np.clip(x, lo, hi) - lo) / (hi - lo) * 255.0
    return scaled.astype(np.uint8)


def interleave_order(
    n_ref: int, n_tgt: int, seed_slice: int, target_seed: int, direction: str
) -> list[tuple[str, int]]:
    """(role, slice) pairs in frame order for one direction.

    ``ref[s], tgt[t], ref[s+d], tgt[t+d], ...`` with ``d = +1`` (superior) or ``-1`` (inferior); once one scan
    runs out of slices in that direction the rest of the other follows consecutively.
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    if not (0 <= seed_slice < n_ref and 0 <= target_seed < n_tgt):
        raise ValueError(f"seed {seed_slice}/{n_ref} or target seed {target_seed}/{n_tgt} out of range")
    step = 1 if direction == "superior" else -1
    ref_slices = list(range(seed_slice, n_ref if step > 0 else -1, step))
    tgt_slices = list(range(target_seed, n_tgt if step > 0 else -1, step))
    order: list[tuple[str, int]] = []
    for layer in range(max(len(ref_slices), len(tgt_slices))):
        if layer < len(ref_slices):
            order.append(("reference", ref_slices[layer]))
        if layer < len(tgt_slices):
            order.append(("target", tgt_slices[layer]))
    return order


@dataclass(frozen=True)
class FrameSequence:
    """One direction's video: uint8 2-D frames (all the same shape) and their frame map."""

    direction: str
    frames: list[np.ndarray]
    frame_map: pd.DataFrame  # FRAME_MAP_COLUMNS; frame_idx is the index inside THIS sequence

    def __len__(self) -> int:
        return len(self.frames)


def common_frame_shape(ref_shape: tuple[int, int], tgt_shape: tuple[int, int]) -> tuple[int, int]:
    """Frame (H, W) used for both stacks: native when equal, else a square of the largest in-plane dim."""
    if tuple(ref_shape) == tuple(tgt_shape):
        return int(ref_shape[0]), int(ref_shape[1])
    side = int(max(*ref_shape, *tgt_shape))
    return side, side


def _resize_u8(slice_u8: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    if slice_u8.shape == tuple(shape):
        return slice_u8
    img = Image.fromarray(slice_u8, mode="L").resize((shape[1], shape[0]), resample=Image.BILINEAR)
    return np.asarray(img, dtype=np.uint8)


def build_frame_sequence(
    ref_u8: np.ndarray,
    tgt_u8: np.ndarray,
    seed_slice: int,
    *,
    target_seed: int | None = None,
    ref_scan: str = "reference",
    tgt_scan: str = "target",
) -> dict[str, FrameSequence]:
    """Interleave two normalised uint8 volumes [z, y, x] into a superior and an inferior sequence.

    Both sequences start with the reference seed frame (the only ``prompted`` frame) followed by the target
    seed-level slice, so each can be tracked forward from frame 0. ``target_seed`` defaults to
    ``target_seed_slice(seed_slice, n_ref, n_tgt)``. Returns ``{"superior": ..., "inferior": ...}``.
    """
    if ref_u8.ndim != 3 or tgt_u8.ndim != 3:
        raise ValueError(f"expected 3-D [z,y,x] volumes, got {ref_u8.shape} and {tgt_u8.shape}")
    if ref_u8.dtype != np.uint8 or tgt_u8.dtype != np.uint8:
        raise ValueError("build_frame_sequence expects uint8 volumes: call normalise_for_frames first")
    n_ref, n_tgt = ref_u8.shape[0], tgt_u8.shape[0]
    if target_seed is None:
        target_seed = target_seed_slice(seed_slice, n_ref, n_tgt)
    shape = common_frame_shape(ref_u8.shape[1:], tgt_u8.shape[1:])
    vols = {"reference": ref_u8, "target": tgt_u8}
    names = {"reference": ref_scan, "target": tgt_scan}

    out: dict[str, FrameSequence] = {}
    for direction in DIRECTIONS:
        order = interleave_order(n_ref, n_tgt, seed_slice, target_seed, direction)
        frames = [_resize_u8(np.ascontiguousarray(vols[role][z]), shape) for role, z in order]
        frame_map = pd.DataFrame(
            {
                "frame_idx": np.arange(len(order), dtype=np.int64),
                "direction": direction,
                "scan": [names[role] for role, _ in order],
                "slice": np.array([z for _, z in order], dtype=np.int64),
                "role": [role for role, _ in order],
                "prompted": [i == 0 for i in range(len(order))],
            },
            columns=FRAME_MAP_COLUMNS,
        )
        out[direction] = FrameSequence(direction=direction, frames=frames, frame_map=frame_map)
    return out


def encode_jpeg(frame: np.ndarray, quality: int = JPEG_QUALITY) -> bytes:
    """Greyscale JPEG bytes (sam2's loader converts to RGB itself)."""
    buf = io.BytesIO()
    Image.fromarray(np.asarray(frame, dtype=np.uint8), mode="L").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def write_frame_stack(
    frames: Sequence[np.ndarray] | FrameSequence,
    folder: Path | str,
    frame_map: pd.DataFrame | None = None,
    quality: int = JPEG_QUALITY,
) -> pd.DataFrame:
    """Write frames as ``<frame_idx>.jpg`` (the layout ``SAM2VideoPredictor.init_state`` reads) into ``folder``.

    Stale ``*.jpg`` from an earlier, longer stack are removed first (sam2 would load them as extra frames).
    The frame map (taken from a FrameSequence or ``frame_map``; a minimal one otherwise) is written next to the
    frames as ``frame_map.parquet`` (sam2 ignores non-JPEG files) and returned.
    """
    if quality < JPEG_QUALITY:
        raise ValueError(
            f"JPEG quality must be >= {JPEG_QUALITY} (lossy frames hurt tracking), got {quality}"
        )
    if isinstance(frames, FrameSequence):
        frame_map = frames.frame_map if frame_map is None else frame_map
        frames = frames.frames
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("*.jpg"):
        stale.unlink()
    for idx, frame in enumerate(frames):
        atomic_write_bytes(encode_jpeg(frame, quality), folder / f"{idx}.jpg")
    if frame_map is None:
        frame_map = pd.DataFrame({"frame_idx": np.arange(len(frames), dtype=np.int64)})
    if len(frame_map) != len(frames):
        raise ValueError(f"frame map has {len(frame_map)} rows for {len(frames)} frames")
    atomic_write_dataframe(frame_map, folder / FRAME_MAP_FILE)
    return frame_map
