"""SAM2 backend tests with RANDOM weights on tiny frames (image_size=64, 64x64 slices): masks are meaningless,
so these check plumbing (prompting, interleaving, IoU capture, presence gating, model reuse), not accuracy.
The accuracy smoke test needs a real checkpoint: set NNSAM2_SAM2_CHECKPOINT (and NNSAM2_SAM2_CONFIG if it is
not the hiera-tiny config)."""

import dataclasses
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import torch

import nnsam2_assets.propagation.sam2 as sam2_backend
from nnsam2_assets.core.masks import largest_component
from nnsam2_assets.ingest.clicks import SliceClicks
from nnsam2_assets.propagation.frames import FRAME_MAP_FILE
from nnsam2_assets.propagation.sam2 import (
    CONFIDENCE_COLUMNS,
    SAM2Propagator,
    SAM2VideoPredictorIoU,
    gate_confidence,
    nolap_labels,
)
from nnsam2_assets.testing.cohorts import two_blob_annotation, two_blob_volume

IMAGE_SIZE = 64
# one thread: tiny 64 px frames gain little from threading, and torch threads oversubscribe badly when
# other processes share the two cores (11 s -> 130 s observed with 2 threads under load)
THREADS = 1
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])  # CUDA runs where present


def _img(arr: np.ndarray) -> sitk.Image:
    return sitk.GetImageFromArray(arr)


@pytest.fixture(scope="module")
def propagator() -> SAM2Propagator:
    torch.manual_seed(0)
    return SAM2Propagator(image_size=IMAGE_SIZE, allow_random_weights=True, device="cpu", threads=THREADS)


@pytest.fixture(scope="module")
def case():
    ref = two_blob_volume(6)
    return ref, two_blob_annotation(ref, 2), 2, two_blob_volume(5, seed=1, shift=2)


def _check_result(res, tgt: np.ndarray, class_ids=(1, 2), t_seed: int | None = None):
    assert res.backend == "sam2" and res.model_id.endswith(f":{IMAGE_SIZE}")
    assert res.masks.dtype == np.uint8 and res.masks.shape == tgt.shape
    assert set(np.unique(res.masks)) <= {0, *class_ids}
    df = res.confidence
    assert list(df.columns) == CONFIDENCE_COLUMNS
    assert len(df) == tgt.shape[0] * len(class_ids)
    assert sorted(zip(df["slice"], df["class_id"], strict=True)) == [
        (z, c) for z in range(tgt.shape[0]) for c in class_ids
    ]
    for row in df.itertuples():
        assert row.area == np.count_nonzero(res.masks[row.slice] == row.class_id)
        # one piece per class and slice, as the registration backend leaves its masks: a leak onto the other
        # side keeps a high predicted IoU and would be selected as an exact training label
        piece = res.masks[row.slice] == row.class_id
        assert largest_component(piece).sum() == row.area
        assert 0.0 <= row.predicted_iou <= 1.0  # captured decoder IoU on every tracked target frame
        assert np.isfinite(row.object_score)
        assert row.present == (row.object_score > 0 and row.area > 0)
        if row.present:
            assert row.confidence == pytest.approx(row.predicted_iou)
        else:
            assert row.confidence == 0.0
        if t_seed is not None:
            assert row.distance == abs(row.slice - t_seed)
            expected = "seed" if row.slice == t_seed else ("superior" if row.slice > t_seed else "inferior")
            assert row.direction == expected


# ----------------------------------------------------------------------------- construction
def test_refuses_random_weights_unless_allowed(tmp_path):
    with pytest.raises(ValueError, match="checkpoint"):
        SAM2Propagator(image_size=IMAGE_SIZE)
    with pytest.raises(FileNotFoundError):
        SAM2Propagator(checkpoint=tmp_path / "missing.pt", image_size=IMAGE_SIZE)
    # 80 is a multiple of 16 and was taken: Hiera's windowed position embedding failed at the first frame
    for size in (100, 80):
        with pytest.raises(ValueError, match=f"multiple of 32, got {size}"):
            SAM2Propagator(image_size=size, allow_random_weights=True)


def test_model_id_and_iou_subclass(propagator):
    assert propagator.model_id == f"sam2.1_hiera_t:random:{IMAGE_SIZE}"
    assert isinstance(propagator.predictor, SAM2VideoPredictorIoU)
    assert propagator.predictor.fill_hole_area == 0
    assert propagator.predictor.image_size == IMAGE_SIZE


# ----------------------------------------------------------------------------- pure helpers
def test_nolap_picks_highest_positive_logit():
    logits = torch.tensor([[[2.0, -1.0, 0.5]], [[1.0, -3.0, 4.0]]])  # K=2, H=1, W=3
    assert nolap_labels(logits, [1, 2]).tolist() == [[1, 0, 2]]


def test_gate_confidence():
    assert gate_confidence(0.9, 1.5, 10) == (0.9, True)
    assert gate_confidence(0.9, -0.1, 10) == (0.0, False)  # absent object, high IoU: not trusted
    assert gate_confidence(0.9, 2.0, 0) == (0.0, False)  # present but empty mask
    assert gate_confidence(float("nan"), 2.0, 5) == (0.0, True)


# ----------------------------------------------------------------------------- propagation
@pytest.mark.parametrize("device", DEVICES)
def test_propagate_shapes_and_confidence_table(propagator, case, device):
    ref, ann, seed, tgt = case
    prop = propagator
    if device != "cpu":
        torch.manual_seed(0)
        prop = SAM2Propagator(
            image_size=IMAGE_SIZE, allow_random_weights=True, device=device, threads=THREADS
        )
    res = prop.propagate(_img(ref), _img(ann), seed, _img(tgt), "mri")
    t_seed = round(seed * (tgt.shape[0] - 1) / (ref.shape[0] - 1))
    _check_result(res, tgt, t_seed=t_seed)


def test_only_reference_seed_frame_is_prompted(propagator, case, monkeypatch, tmp_path):
    ref, ann, seed, tgt = case
    calls = []
    original = propagator.predictor.add_new_mask

    def spy(state, frame_idx, obj_id, mask):
        calls.append((frame_idx, obj_id, np.asarray(mask).copy()))
        return original(state, frame_idx, obj_id, mask)

    monkeypatch.setattr(propagator.predictor, "add_new_mask", spy)
    monkeypatch.setattr(propagator, "work_dir", tmp_path)  # keep the frames to inspect them
    propagator.propagate(_img(ref), _img(ann), seed, _img(tgt), "mri")

    assert [(f, o) for f, o, _ in calls] == [(0, 1), (0, 2), (0, 1), (0, 2)]  # 2 directions x 2 classes
    for _, obj_id, mask in calls:
        np.testing.assert_array_equal(mask, ann[seed] == obj_id)
    for direction, fm in propagator.last_frame_maps.items():
        prompted = fm[fm["prompted"]]
        assert prompted["frame_idx"].tolist() == [0]
        assert (prompted["role"].item(), prompted["slice"].item()) == ("reference", seed)
        # the frames sam2 read are exactly the frame map's, as <int>.jpg
        folder = Path(tmp_path) / direction
        assert sorted(int(p.stem) for p in folder.glob("*.jpg")) == fm["frame_idx"].tolist()
        assert (folder / FRAME_MAP_FILE).is_file()


def test_the_asset_keeps_the_frames_sam2_tracked_and_registration_writes_none(propagator, tmp_path):
    """``propagated_masks`` passes each scan's frame folder: the frames a user finds are the ones SAM2 read.
    Switching the same storage to registration leaves none of them behind (they had stayed, beside masks
    they no longer made)."""
    from nnsam2_assets.core.layout import DatasetLayout
    from nnsam2_assets.ingest.annotation import write_reference_annotation
    from nnsam2_assets.ingest.convention import load_dataset
    from nnsam2_assets.ingest.scans import ingest_scans, ok_scans
    from nnsam2_assets.propagation.backends import build_propagator
    from nnsam2_assets.propagation.steps import propagate_masks
    from nnsam2_assets.testing.cohorts import write_tiny_dataset

    write_tiny_dataset(tmp_path / "data", "ds", 2, seed=2)
    spec = load_dataset(tmp_path / "data", "ds")
    layout = DatasetLayout(tmp_path / "storage", "ds")
    ingest_scans(spec, layout)
    write_reference_annotation(spec, layout)
    for backend in ("sam2", "registration"):
        build = (lambda: propagator) if backend == "sam2" else (lambda: build_propagator("registration"))
        propagate_masks(spec, layout, build, backend)
        for scan in ok_scans(layout):
            maps = sorted(layout.frames(scan).glob(f"*/{FRAME_MAP_FILE}"))
            if backend == "registration":
                assert maps == [] and not layout.frames(scan).exists()
                continue
            assert [m.parent.name for m in maps] == ["inferior", "superior"]
            n_slices = sitk.ReadImage(str(layout.masks(scan))).GetSize()[2]
            targets = set()
            for m in maps:
                frame_map = pd.read_parquet(m)
                assert len(list(m.parent.glob("*.jpg"))) == len(frame_map)
                targets |= set(frame_map.slice[frame_map.role == "target"])
            assert targets == set(range(n_slices))  # every target slice was tracked from these frames


def test_sam2_loader_reads_written_frames(propagator, case, tmp_path, monkeypatch):
    from sam2.utils.misc import load_video_frames

    ref, ann, seed, tgt = case
    monkeypatch.setattr(propagator, "work_dir", tmp_path)
    propagator.propagate(_img(ref), _img(ann), seed, _img(tgt), "mri")
    images, h, w = load_video_frames(
        str(tmp_path / "superior"), IMAGE_SIZE, offload_video_to_cpu=True, compute_device=torch.device("cpu")
    )
    assert images.shape == (len(propagator.last_frame_maps["superior"]), 3, IMAGE_SIZE, IMAGE_SIZE)
    assert (h, w) == ref.shape[1:]


def test_iou_captured_per_frame_and_object(propagator, case, tmp_path):
    """Drive the predictor directly: prompted frame IoU = 1 (mask used as output), tracked frames in [0,1]."""
    ref, ann, seed, tgt = case
    from nnsam2_assets.propagation.frames import build_frame_sequence, normalise_for_frames, write_frame_stack

    seq = build_frame_sequence(normalise_for_frames(ref, "mri"), normalise_for_frames(tgt, "mri"), seed)
    write_frame_stack(seq["superior"], tmp_path)
    pred = propagator.predictor
    with sam2_backend._torch_threads(THREADS):
        state = pred.init_state(str(tmp_path))
        for cid in (1, 2):
            pred.add_new_mask(state, 0, cid, ann[seed] == cid)
        seen = [f for f, _, _ in pred.propagate_in_video(state)]
    assert seen == list(range(len(seq["superior"])))
    for obj_idx in (0, 1):
        out = state["output_dict_per_obj"][obj_idx]
        assert out["cond_frame_outputs"][0]["pred_iou"].item() == pytest.approx(1.0)
        for f in seen[1:]:
            frame_out = out["non_cond_frame_outputs"][f]
            assert frame_out["pred_iou"].shape == (1,)
            assert 0.0 <= frame_out["pred_iou"].item() <= 1.0
            assert frame_out["object_score_logits"].shape == (1, 1)
    pred.reset_state(state)


@pytest.mark.parametrize("bias", [-50.0, 50.0])
def test_presence_gating_with_forced_object_scores(propagator, case, bias):
    """Force the object-score head absent/present: absent -> empty masks and confidence 0 on every slice."""
    ref, ann, seed, tgt = case
    head_bias = propagator.predictor.sam_mask_decoder.pred_obj_score_head.layers[-1].bias
    saved = head_bias.detach().clone()
    try:
        with torch.no_grad():
            head_bias.fill_(bias)
        res = propagator.propagate(_img(ref), _img(ann), seed, _img(tgt), "mri")
    finally:
        with torch.no_grad():
            head_bias.copy_(saved)
    _check_result(res, tgt)
    df = res.confidence
    if bias < 0:
        assert not res.masks.any()
        assert (df["object_score"] < 0).all() and not df["present"].any() and (df["confidence"] == 0).all()
        assert (df["predicted_iou"] > 0).all()  # the decoder still claims an IoU: gating is what removes it
    else:
        assert (df["object_score"] > 0).all()
        shown = df[df["area"] > 0]
        assert len(shown) > 0 and shown["present"].all() and (shown["confidence"] > 0).all()


def test_the_reference_propagated_onto_itself_keeps_its_annotated_slice_exactly(propagator, case):
    """As the registration backend does: the held-out check and the reference's final mask take that slice
    for the annotation itself, where it had been SAM2's upsampled track (random weights: thousands of pixels
    off)."""
    ref, ann, seed, _ = case
    res = propagator.propagate(_img(ref), _img(ann), seed, _img(ref), "mri")
    np.testing.assert_array_equal(res.masks[seed], ann[seed])
    df = res.confidence
    at_seed = df[df["slice"] == seed]
    assert at_seed["present"].all() and (at_seed["confidence"] == 1.0).all()
    assert list(at_seed["area"]) == [int((ann[seed] == c).sum()) for c in (1, 2)]
    tracked = df[(df["slice"] != seed) & df["present"]]  # the other slices stay SAM2's, IoU as confidence
    np.testing.assert_allclose(tracked["confidence"], tracked["predicted_iou"].clip(0, 1))


def test_model_built_once_for_several_targets(case):
    ref, ann, seed, _ = case
    torch.manual_seed(0)
    before = sam2_backend.MODEL_BUILDS
    prop = SAM2Propagator(image_size=IMAGE_SIZE, allow_random_weights=True, device="cpu", threads=THREADS)
    assert sam2_backend.MODEL_BUILDS - before == 1
    predictor = prop.predictor
    targets = [
        two_blob_volume(4, seed=2),
        two_blob_volume(7, hw=(48, 64), seed=3),
        two_blob_volume(3, hw=(64, 80), seed=4),
    ]
    for tgt in targets:  # unequal lengths and in-plane sizes
        res = prop.propagate(_img(ref), _img(ann), seed, _img(tgt), "mri")
        _check_result(res, tgt)
    assert sam2_backend.MODEL_BUILDS - before == 1
    assert prop.predictor is predictor


def test_ct_modality_runs(propagator):
    ref = two_blob_volume(4) - 60.0  # HU-ish: background ~40 HU, muscles ~240 HU (clipped by the window)
    ann = two_blob_annotation(ref + 60.0, 1)
    res = propagator.propagate(_img(ref), _img(ann), 1, _img(two_blob_volume(4, seed=5) - 60.0), "ct")
    _check_result(res, ref)


# ----------------------------------------------------------------------------- real weights (opt-in)
@pytest.mark.skipif(
    not os.environ.get("NNSAM2_SAM2_CHECKPOINT"),
    reason="needs real SAM2 weights: set NNSAM2_SAM2_CHECKPOINT=/path/to/sam2.1_hiera_tiny.pt "
    "(and NNSAM2_SAM2_CONFIG for another model size); none ship with the repo",
)
def test_real_checkpoint_tracks_the_blobs():
    prop = SAM2Propagator(
        config=os.environ.get("NNSAM2_SAM2_CONFIG", sam2_backend.DEFAULT_CONFIG),
        checkpoint=os.environ["NNSAM2_SAM2_CHECKPOINT"],
        image_size=512,
    )
    ref = two_blob_volume(6, hw=(128, 128))
    ann = two_blob_annotation(ref, 2)
    tgt = two_blob_volume(6, hw=(128, 128), seed=1, shift=3)
    res = prop.propagate(_img(ref), _img(ann), 2, _img(tgt), "mri")
    dices = []
    for z in range(tgt.shape[0]):
        truth_z = two_blob_annotation(tgt, z)[z]  # the phantom's own bright blobs, split by side
        for c in (1, 2):
            a, b = res.masks[z] == c, truth_z == c
            dices.append(2 * (a & b).sum() / max(a.sum() + b.sum(), 1))
    assert np.mean(dices) > 0.6
    assert res.confidence["present"].mean() > 0.8


def test_registry_builds_protocol_conformant_backend():
    from nnsam2_assets.propagation.backends import build_propagator
    from nnsam2_assets.propagation.base import Propagator

    prop = build_propagator(
        "sam2", image_size=IMAGE_SIZE, allow_random_weights=True, device="cpu", threads=THREADS
    )
    assert isinstance(prop, SAM2Propagator) and isinstance(prop, Propagator)
    assert prop.backend == "sam2"


def test_the_cache_identity_follows_the_checkpoints_content_not_its_file_times(propagator, tmp_path):
    """The identity was the checkpoint's size and mtime: a checkpoint downloaded again or copied without -p,
    the same bytes, re-propagated every scan of every SAM2 dataset; the mask rules are in it too."""
    from nnsam2_assets.propagation.sam2 import MASKS_VERSION
    from nnsam2_assets.propagation.settings import PropagationConfig

    ckpt = tmp_path / "sam2.pt"
    torch.save({"model": propagator.predictor.state_dict()}, ckpt)
    before = PropagationConfig(sam2_checkpoint=str(ckpt)).identity()
    copy = tmp_path / "again" / "sam2.pt"
    copy.parent.mkdir()
    copy.write_bytes(ckpt.read_bytes())
    os.utime(copy, (1, 1))
    assert PropagationConfig(sam2_checkpoint=str(copy)).identity() == before
    assert MASKS_VERSION in before
    copy.write_bytes(ckpt.read_bytes() + b"\0")
    assert PropagationConfig(sam2_checkpoint=str(copy)).identity() != before


def test_checkpoint_is_loaded_and_hashed_into_model_id(propagator, tmp_path):
    """A checkpoint in sam2's format ({"model": state_dict}) round-trips; its sha256 prefix names the model."""
    from nnsam2_assets.core.storage import sha256_file

    ckpt = tmp_path / "tiny_random.pt"
    torch.save({"model": propagator.predictor.state_dict()}, ckpt)
    loaded = SAM2Propagator(checkpoint=ckpt, image_size=IMAGE_SIZE, device="cpu", threads=THREADS)
    assert loaded.model_id == f"sam2.1_hiera_t:{sha256_file(ckpt)[:12]}:{IMAGE_SIZE}"
    for (name, a), (_, b) in zip(
        propagator.predictor.state_dict().items(), loaded.predictor.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name


def test_click_prompts_go_to_the_point_api_on_the_seed_frame(propagator, case, monkeypatch):
    """Clicks replace the mask prompt: per class its positive and negative points, in frame pixels."""
    ref, ann, seed, tgt = case
    rows, cols, ids, positive = [], [], [], []
    for cid in (1, 2):
        ys, xs = np.nonzero(ann[seed] == cid)
        rows += [int(ys.mean()), 0]
        cols += [int(xs.mean()), 0]
        ids += [cid, cid]
        positive += [True, False]
    clicks = SliceClicks(seed, tuple(rows), tuple(cols), tuple(ids), tuple(positive))
    calls, masks = [], []
    original = propagator.predictor.add_new_points_or_box

    def spy(state, frame_idx, obj_id, points, labels):
        calls.append((frame_idx, obj_id, np.asarray(points).copy(), np.asarray(labels).copy()))
        return original(state, frame_idx, obj_id, points=points, labels=labels)

    monkeypatch.setattr(propagator.predictor, "add_new_points_or_box", spy)
    monkeypatch.setattr(propagator.predictor, "add_new_mask", lambda *a, **k: masks.append(a))
    res = propagator.propagate(_img(ref), _img(ann), seed, _img(tgt), "mri", clicks=clicks)
    _check_result(res, tgt)
    assert not masks
    assert [(f, o) for f, o, _, _ in calls] == [(0, 1), (0, 2), (0, 1), (0, 2)]  # 2 directions x 2 classes
    for _, obj_id, points, labels in calls:
        expected, expected_labels = clicks.for_class(obj_id)
        np.testing.assert_allclose(points, expected)  # equal shapes: frames at native size, scale 1
        np.testing.assert_array_equal(labels, expected_labels)
    with pytest.raises(ValueError, match="the clicks lie on slice"):
        other = SliceClicks(seed + 1, *dataclasses.astuple(clicks)[1:])
        propagator.propagate(_img(ref), _img(ann), seed, _img(tgt), "mri", clicks=other)
