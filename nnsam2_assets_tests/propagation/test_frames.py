import io

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from nnsam2_assets.propagation.frames import (
    FRAME_MAP_COLUMNS,
    FRAME_MAP_FILE,
    build_frame_sequence,
    common_frame_shape,
    encode_jpeg,
    interleave_order,
    normalise_for_frames,
    write_frame_stack,
)


def _vol(n: int, shape=(8, 10), offset: int = 0) -> np.ndarray:
    """uint8 volume whose slice z is filled with (offset + z) so frames are traceable to their slice."""
    return np.stack([np.full(shape, offset + z, dtype=np.uint8) for z in range(n)])


# ----------------------------------------------------------------------------- normalisation
def test_ct_window_maps_minus30_150_hu_to_full_range():
    arr = np.array([-1000.0, -30.0, 60.0, 150.0, 3000.0])
    out = normalise_for_frames(arr, "ct")
    assert out.dtype == np.uint8
    assert out.tolist() == [0, 0, 127, 255, 255]


def test_mri_uses_volume_percentiles():
    rng = np.random.default_rng(0)
    arr = rng.normal(500, 100, size=(4, 32, 32))
    arr[0, 0, 0] = 1e6  # a single outlier must not squash the contrast (99.5 % percentile clips it)
    out = normalise_for_frames(arr, "MRI")
    assert out.dtype == np.uint8 and out.shape == arr.shape
    assert out.min() == 0 and out.max() == 255
    assert 100 < np.median(out) < 155


def test_constant_volume_and_bad_modality():
    assert not normalise_for_frames(np.full((2, 3, 3), 7.0), "mri").any()
    with pytest.raises(ValueError, match="modality"):
        normalise_for_frames(np.zeros((1, 2, 2)), "pet")


# ----------------------------------------------------------------------------- interleaving
def test_interleave_superior_ref_longer():
    # ref 6 slices seed 2, tgt 4 slices seed 1: ref has 4 superior layers (2..5), tgt 3 (1..3)
    order = interleave_order(6, 4, 2, 1, "superior")
    assert order == [
        ("reference", 2),
        ("target", 1),
        ("reference", 3),
        ("target", 2),
        ("reference", 4),
        ("target", 3),
        ("reference", 5),
    ]


def test_interleave_inferior_target_longer():
    # ref 4 slices seed 1 (inferior layers 1,0), tgt 8 slices seed 4 (inferior layers 4..0)
    order = interleave_order(4, 8, 1, 4, "inferior")
    assert order == [
        ("reference", 1),
        ("target", 4),
        ("reference", 0),
        ("target", 3),
        ("target", 2),
        ("target", 1),
        ("target", 0),
    ]


def test_interleave_seed_at_edge_and_errors():
    assert interleave_order(3, 5, 2, 4, "superior") == [("reference", 2), ("target", 4)]
    with pytest.raises(ValueError):
        interleave_order(3, 5, 3, 0, "superior")
    with pytest.raises(ValueError):
        interleave_order(3, 5, 0, 0, "up")


def test_build_frame_sequence_maps_frames_to_slices():
    ref, tgt = _vol(6), _vol(9, offset=100)
    seqs = build_frame_sequence(ref, tgt, 2, ref_scan="subj00", tgt_scan="subj07")
    assert set(seqs) == {"superior", "inferior"}
    t_seed = round(2 * 8 / 5)  # CONTRACTS formula: 3
    covered: list[int] = []
    for direction, seq in seqs.items():
        fm = seq.frame_map
        assert list(fm.columns) == FRAME_MAP_COLUMNS
        assert fm["frame_idx"].tolist() == list(range(len(seq)))
        assert (fm["direction"] == direction).all()
        # only the reference seed frame is prompted, and it is frame 0; the target seed level follows it
        assert fm["prompted"].tolist() == [True] + [False] * (len(fm) - 1)
        assert (fm.loc[0, "role"], fm.loc[0, "slice"], fm.loc[0, "scan"]) == ("reference", 2, "subj00")
        assert (fm.loc[1, "role"], fm.loc[1, "slice"], fm.loc[1, "scan"]) == ("target", t_seed, "subj07")
        # each frame carries exactly the pixels of the slice the map names
        for row, frame in zip(fm.itertuples(), seq.frames, strict=True):
            expected = row.slice + (100 if row.role == "target" else 0)
            assert frame.shape == (8, 10) and (frame == expected).all()
        step = 1 if direction == "superior" else -1
        tgt_slices = fm.loc[fm["role"] == "target", "slice"].tolist()
        assert tgt_slices == list(range(t_seed, 9 if step > 0 else -1, step))
        covered += tgt_slices
    # every target slice is in some sequence; only the seed level is in both
    assert sorted(set(covered)) == list(range(9)) and len(covered) == 10


def test_explicit_target_seed_and_dtype_check():
    seqs = build_frame_sequence(_vol(4), _vol(4, offset=50), 0, target_seed=3)
    assert seqs["superior"].frame_map["slice"].tolist() == [0, 3, 1, 2, 3]
    assert seqs["inferior"].frame_map["slice"].tolist() == [0, 3, 2, 1, 0]
    with pytest.raises(ValueError, match="uint8"):
        build_frame_sequence(np.zeros((2, 4, 4)), _vol(2, (4, 4)), 0)


def test_unequal_in_plane_sizes_resampled_to_common_square():
    assert common_frame_shape((8, 10), (8, 10)) == (8, 10)
    assert common_frame_shape((8, 10), (12, 6)) == (12, 12)
    seqs = build_frame_sequence(_vol(3, (8, 10)), _vol(5, (12, 6), offset=100), 1)
    for seq in seqs.values():
        for row, frame in zip(seq.frame_map.itertuples(), seq.frames, strict=True):
            assert frame.shape == (12, 12)
            expected = row.slice + (100 if row.role == "target" else 0)
            assert (frame == expected).all()  # constant slices stay constant under bilinear resizing


# ----------------------------------------------------------------------------- writing
def test_write_frame_stack_jpeg_q95_readable_and_map(tmp_path):
    rng = np.random.default_rng(1)
    ref = rng.integers(0, 256, size=(4, 32, 40), dtype=np.uint8)
    tgt = rng.integers(0, 256, size=(3, 32, 40), dtype=np.uint8)
    seq = build_frame_sequence(ref, tgt, 1)["superior"]
    folder = tmp_path / "frames"
    folder.mkdir()
    (folder / "17.jpg").write_bytes(b"stale")  # left over from a longer stack: must not survive
    fm = write_frame_stack(seq, folder)
    names = sorted(p.name for p in folder.glob("*.jpg"))
    assert names == sorted(f"{i}.jpg" for i in range(len(seq)))
    q95_tables = Image.open(io.BytesIO(encode_jpeg(seq.frames[0], 95))).quantization
    q75_tables = Image.open(io.BytesIO(_jpeg_q(seq.frames[0], 75))).quantization
    for i, frame in enumerate(seq.frames):
        img = Image.open(folder / f"{i}.jpg")
        assert img.format == "JPEG" and img.size == (40, 32)
        assert img.quantization == q95_tables != q75_tables
        decoded = np.asarray(img.convert("L"), dtype=np.int16)
        assert decoded.shape == frame.shape
        assert np.abs(decoded - frame).mean() < 12  # q95 on white noise: lossy but close
    stored = pd.read_parquet(folder / FRAME_MAP_FILE)
    pd.testing.assert_frame_equal(stored, fm)
    pd.testing.assert_frame_equal(fm, seq.frame_map)


def _jpeg_q(frame: np.ndarray, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(frame, mode="L").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def test_write_frame_stack_plain_list_and_quality_floor(tmp_path):
    frames = [np.full((6, 6), v, dtype=np.uint8) for v in (0, 128, 255)]
    fm = write_frame_stack(frames, tmp_path / "f")
    assert fm["frame_idx"].tolist() == [0, 1, 2]
    assert [int(np.asarray(Image.open(tmp_path / "f" / f"{i}.jpg")).mean()) for i in range(3)] == [
        0,
        128,
        255,
    ]
    with pytest.raises(ValueError, match="quality"):
        write_frame_stack(frames, tmp_path / "g", quality=75)
