"""Tests for the nnU-Net wrapper: raw layout, sanitising, env scoping, no mirroring, a tiny real train."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnsam2_assets.refinement import nnunet as nn

CLASSES = ["right_lpm", "left_lpm"]
RAW = "nnUNet_raw"  # nnU-Net's own (lower-case) env var names


def _write(arr: np.ndarray, path: Path, spacing=(2.0, 2.0, 3.0)) -> Path:
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    sitk.WriteImage(img, str(path))
    return path


def _blob_case(root: Path, cid: str, rng, shape=(8, 48, 48), ignore: bool = False, spacing=(2.0, 2.0, 3.0)):
    """Two blobs: class 1 at low x (patient right), class 2 at high x (patient left)."""
    _, y, x = np.mgrid[: shape[0], : shape[1], : shape[2]]
    img = rng.normal(0, 5, shape).astype(np.float32) + 50
    lab = np.zeros(shape, np.uint8)
    cy = shape[1] // 2 + int(rng.integers(-3, 4))
    for cls, cx in ((1, 0.3 * shape[2]), (2, 0.7 * shape[2])):
        m = ((y - cy) / (0.15 * shape[1])) ** 2 + (
            (x - cx - rng.integers(-2, 3)) / (0.12 * shape[2])
        ) ** 2 <= 1
        lab[m] = cls
        img[m] += 60
    if ignore:  # unannotated top slices, as pseudo-labels with unreliable slices would be
        lab[-2:] = 3
    safe = cid.replace("/", "_")
    image = _write(img, root / f"img_{safe}.nii.gz", spacing)
    label = _write(lab, root / f"lab_{safe}.nii.gz", spacing)
    return nn.TrainingCase(cid, image, label)


def _cases(root: Path, n: int, ignore: bool = False, **kw) -> list[nn.TrainingCase]:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    return [_blob_case(root, f"sub {i:02d}.v1", rng, ignore=ignore, **kw) for i in range(n)]


TINY = nn.get_profile("quick", num_epochs=2, iterations_per_epoch=8, val_iterations_per_epoch=2)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny real training run (with ignore-labelled slices) shared by the round-trip tests."""
    tmp = tmp_path_factory.mktemp("nnunet")
    cases = _cases(tmp / "data", 6, ignore=True)
    env_before = {k: os.environ.get(k) for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    info = nn.train_model(cases, CLASSES, True, tmp / "work", tmp / "models" / "stage1", TINY, seed=1)
    env_after = {k: os.environ.get(k) for k in env_before}
    return {"info": info, "cases": cases, "tmp": tmp, "env": (env_before, env_after)}


# ------------------------------------------------------------------------------------------ pure parts
def test_profiles():
    quick, paper = nn.get_profile("quick"), nn.get_profile("paper")
    assert quick.configuration == "2d" and quick.max_patch <= 128 and quick.max_batch <= 4
    assert quick.target_inplane_spacing_mm == 2.0 and quick.total_iterations <= 600
    assert (paper.configuration, paper.num_epochs, paper.iterations_per_epoch) == ("3d_fullres", 1000, 250)
    assert nn.get_profile("quick", num_epochs=3).num_epochs == 3
    assert str(nn.resolve_device("cpu")) == "cpu"
    with pytest.raises(KeyError):
        nn.get_profile("nope")


def test_sanitize_case_ids():
    assert nn.sanitize_case_id("sub 01.v1") == "sub_01_v1"
    assert nn.sanitize_case_id("a/b\\c:d") == "a_b_c_d"
    assert nn.sanitize_case_id("...") == "case"
    ids = nn._unique_ids(["a b", "a_b", "A.B"])
    assert ids == {"a b": "a_b", "a_b": "a_b_2", "A.B": "A_B_3"}
    with pytest.raises(ValueError):
        nn._unique_ids(["x", "x"])


def test_write_raw_dataset_layout(tmp_path):
    cases = _cases(tmp_path / "src", 3, ignore=True)
    raw = nn.write_raw_dataset(tmp_path / "raw", 7, "My Set!", cases, CLASSES, use_ignore=True)
    assert raw.folder == tmp_path / "raw" / "Dataset007_MySet"
    meta = json.loads((raw.folder / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "zscore_mixed"}
    assert meta["labels"] == {"background": 0, "right_lpm": 1, "left_lpm": 2, "ignore": 3}
    assert meta["numTraining"] == 3 and meta["file_ending"] == ".nii.gz"
    for cid in ("sub_00_v1", "sub_01_v1", "sub_02_v1"):
        img = sitk.ReadImage(str(raw.folder / "imagesTr" / f"{cid}_0000.nii.gz"))
        lab = sitk.ReadImage(str(raw.folder / "labelsTr" / f"{cid}.nii.gz"))
        assert lab.GetPixelID() == sitk.sitkUInt8 and lab.GetSize() == img.GetSize()
        assert sitk.GetArrayFromImage(lab).max() == 3
    assert raw.case_ids["sub 01.v1"] == "sub_01_v1"
    # without ignore: no "ignore" entry, and the value 3 is rejected
    with pytest.raises(ValueError, match="label values"):
        nn.write_raw_dataset(tmp_path / "raw", 8, "x", cases, CLASSES, use_ignore=False)
    ok = nn.write_raw_dataset(tmp_path / "raw", 9, "x", _cases(tmp_path / "s2", 1), CLASSES, use_ignore=False)
    assert "ignore" not in json.loads((ok.folder / "dataset.json").read_text())["labels"]


def test_label_grid_mismatch_rejected(tmp_path):
    (tmp_path / "d").mkdir()
    img = _write(np.zeros((4, 16, 16), np.float32), tmp_path / "d" / "i.nii.gz")
    lab = _write(np.zeros((4, 16, 12), np.uint8), tmp_path / "d" / "l.nii.gz")
    with pytest.raises(ValueError, match="does not match"):
        nn.write_raw_dataset(tmp_path / "raw", 1, "x", [nn.TrainingCase("a", img, lab)], CLASSES, False)


def test_nnunet_env_sets_and_restores(monkeypatch, tmp_path):
    monkeypatch.setenv("nnUNet_raw", "/somewhere/else")
    monkeypatch.delenv("nnUNet_results", raising=False)
    with nn.nnunet_env(tmp_path / "r", tmp_path / "p", tmp_path / "res"):
        from nnunetv2.paths import nnUNet_raw, nnUNet_results

        assert os.fspath(nnUNet_raw) == str(tmp_path / "r")  # nnunetv2 reads them lazily
        assert os.fspath(nnUNet_results) == str(tmp_path / "res")
    assert os.environ[RAW] == "/somewhere/else"
    assert "nnUNet_results" not in os.environ
    with pytest.raises(RuntimeError), nn.nnunet_env(tmp_path):
        raise RuntimeError("boom")
    assert os.environ[RAW] == "/somewhere/else"


def test_quick_plan_caps_patch_and_batch_and_resamples(tmp_path):
    # 300 px at 1 mm -> 150 px at 2 mm: the patch must still be capped at 128
    cases = _cases(tmp_path / "d", 2, shape=(3, 300, 300), spacing=(1.0, 1.0, 4.0))
    raw = nn.write_raw_dataset(tmp_path / "raw", 3, "big", cases, CLASSES, False)
    with nn.nnunet_env(tmp_path / "raw", tmp_path / "pre", tmp_path / "res"):
        plans = nn.plan_and_preprocess(raw, tmp_path / "pre", nn.get_profile("quick"))
    cfg = plans["configurations"]["2d"]
    assert max(cfg["patch_size"]) <= 128 and cfg["batch_size"] <= 4
    assert cfg["spacing"] == [2.0, 2.0]
    assert (tmp_path / "pre" / raw.name / cfg["data_identifier"]).is_dir()
    assert cfg["architecture"]["arch_kwargs"]["features_per_stage"][0] == 32  # nnU-Net's width unless asked
    with nn.nnunet_env(tmp_path / "raw", tmp_path / "pre", tmp_path / "res"):
        narrow = nn.plan_and_preprocess(raw, tmp_path / "pre", nn.get_profile("quick", base_features=16))
    widths = narrow["configurations"]["2d"]["architecture"]["arch_kwargs"]["features_per_stage"]
    assert list(widths[:3]) == [16, 32, 64]
    # the fingerprint's intensity sample is small because nothing reads it: every case is z-scored on its own
    assert cfg["normalization_schemes"] == ["ZScoreNormalization"]
    extractor = nn.planning.fingerprint_extractor_class()
    with nn.nnunet_env(tmp_path / "raw", tmp_path / "pre", tmp_path / "res"):
        fpe = extractor(raw.dataset_id, 1, verbose=False)
    assert fpe.num_foreground_voxels_for_intensitystats == 2 * nn.planning.FINGERPRINT_SAMPLES_PER_CASE


def test_a_thin_slice_scan_is_still_planned_in_axial_slices(tmp_path):
    """nnU-Net puts the axis of coarsest spacing first: slices thinner than the pixels (a thin-slice CT) were
    planned as coronal 2d slices, z resampled to 2 mm, and the muscle box no longer held both sides."""
    cases = _cases(tmp_path / "d", 2, shape=(24, 48, 48), spacing=(0.8, 0.8, 0.6))
    raw = nn.write_raw_dataset(tmp_path / "raw", 4, "thin", cases, CLASSES, False)
    with nn.nnunet_env(tmp_path / "raw", tmp_path / "pre", tmp_path / "res"):
        plans = nn.plan_and_preprocess(raw, tmp_path / "pre", nn.get_profile("quick"))
    assert plans["transpose_forward"] == [0, 1, 2]
    assert plans["configurations"]["2d"]["spacing"] == [2.0, 2.0]  # y and x, each coarsened to 2 mm


def test_failed_training_publishes_nothing(tmp_path):
    cases = _cases(tmp_path / "d", 2)
    bad = nn.get_profile("quick", configuration="3d_lowres", target_inplane_spacing_mm=None, max_patch=None,
                         max_batch=None)  # fmt: skip
    with pytest.raises(ValueError):
        nn.train_model(cases, CLASSES, False, tmp_path / "work", tmp_path / "models" / "m", bad)
    assert not (tmp_path / "models" / "m").exists()
    assert not [p for p in (tmp_path / "models").glob("*") if p.name.startswith(".tmp-")]
    with pytest.raises(FileNotFoundError):
        nn.Predictor.load(tmp_path / "work")  # not a published model folder


# --------------------------------------------------------------------------------- tiny real training
def test_train_publishes_complete_model(trained):
    info: nn.ModelInfo = trained["info"]
    model_dir = info.model_dir
    assert (model_dir / nn.MODEL_INFO_FILE).is_file()
    assert (model_dir / "fold_all" / "checkpoint_final.pth").is_file()
    assert not (model_dir / "fold_all" / "checkpoint_best.pth").exists()
    assert not [p for p in model_dir.parent.iterdir() if p.name.startswith((".tmp-", ".old-"))]
    assert info.fold == "all" and info.configuration == "2d" and info.use_ignore
    assert info.seconds_per_iteration > 0 and info.train_seconds > 0 and info.batch_size <= 4
    # one time per epoch, each a part of the timed training call (which also plans, validates and publishes)
    assert len(info.epoch_seconds) == info.num_epochs and min(info.epoch_seconds) > 0
    assert sum(info.epoch_seconds) <= info.train_seconds
    assert info.final_train_loss is not None and len(info.pseudo_dice) == 2
    assert nn.ModelInfo.from_dir(model_dir) == info
    plan = json.loads((model_dir / "plans.json").read_text())["configurations"][info.configuration]
    assert info.features_per_stage == list(plan["architecture"]["arch_kwargs"]["features_per_stage"])
    assert info.features_per_stage[0] == 32  # nnU-Net's width: the profile does not narrow it by default
    before, after = trained["env"]
    assert before == after  # nnUNet_* env vars are scoped to the call


def test_trainer_has_no_mirroring(trained, tmp_path):
    import torch

    model_dir = trained["info"].model_dir
    ckpt = torch.load(model_dir / "fold_all" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert ckpt["inference_allowed_mirroring_axes"] is None
    assert ckpt["trainer_name"] == nn.TRAINER_NAME
    plans = json.loads((model_dir / "plans.json").read_text())
    plans["continue_training"] = False
    with nn.nnunet_env(results=tmp_path / "res"):
        tr = nn.trainer_class()(plans, "2d", "all", json.loads((model_dir / "dataset.json").read_text()),
                                torch.device("cpu"))  # fmt: skip
        rotation, _, _, mirror_axes = tr.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
    assert mirror_axes is None and tr.inference_allowed_mirroring_axes is None
    # nnU-Net's default 2d augmentation rotates up to +-180 degrees, which swaps left and right like a mirror
    assert max(abs(r) for r in rotation) <= np.deg2rad(nn.trainers.MAX_ROTATION_DEG) + 1e-9 < np.pi / 2


def test_a_warm_start_begins_at_the_checkpoints_weights_and_trains_its_own_epochs(trained, tmp_path):
    import torch

    source = trained["info"].checkpoint
    # a learning rate that leaves the weights where they started, so the start shows in the published model
    still = TINY.replace(initial_lr=1e-9)
    info = nn.train_model(trained["cases"], CLASSES, True, tmp_path / "work", tmp_path / "warm", still, seed=2,
                          warm_start=nn.WarmStart(source, 1))  # fmt: skip
    assert info.warm_started_from == str(source) and info.num_epochs == 1 != TINY.num_epochs
    assert nn.ModelInfo.from_dir(info.model_dir) == info

    def checkpoint(path: Path) -> dict:
        return torch.load(path, map_location="cpu", weights_only=False)

    source_ckpt = checkpoint(source)
    before, after = source_ckpt["network_weights"], checkpoint(info.checkpoint)["network_weights"]
    transferred = [k for k in before if ".seg_layers." not in k]  # nnU-Net leaves the output layers fresh
    assert transferred and all(torch.allclose(before[k], after[k], atol=1e-4) for k in transferred)

    # a checkpoint of another network: training starts fresh, for the profile's own epochs
    other = dict(source_ckpt)
    key = transferred[0]
    other["network_weights"] = {**before, key: torch.zeros((1, *before[key].shape[1:]))}
    torch.save(other, tmp_path / "other.pth")
    fresh = nn.train_model(trained["cases"], CLASSES, True, tmp_path / "work", tmp_path / "fresh", TINY,
                           seed=2, warm_start=nn.WarmStart(tmp_path / "other.pth", 1))  # fmt: skip
    assert fresh.warm_started_from is None and fresh.num_epochs == TINY.num_epochs


def test_training_with_background_data_workers_is_reproduced_by_its_seed(trained, tmp_path):
    """A GPU trains with augmentation workers (``data_workers`` None is up to 8 there): each worker's numpy and
    torch streams and the order their batches arrive in follow the training seed, so a rerun reproduces the
    model, as it does with the in-process loader."""
    import torch

    profile = TINY.replace(num_epochs=1, data_workers=2)
    weights = [
        torch.load(
            nn.train_model(trained["cases"], CLASSES, True, tmp_path / f"work{run}", tmp_path / f"m{run}",
                           profile, seed=3).checkpoint,
            map_location="cpu", weights_only=False,
        )["network_weights"]
        for run in range(2)
    ]  # fmt: skip
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_predict_round_trip_loads_once(trained):
    n0 = nn.PREDICTOR_LOADS
    pred = nn.Predictor.load(trained["info"].model_dir, device="auto")
    assert n0 + 1 == nn.PREDICTOR_LOADS
    assert pred.use_mirroring is False and pred.allowed_mirroring_axes is None
    for case in trained["cases"][:2]:
        img = sitk.ReadImage(str(case.image))
        seg = pred.predict(img)
        assert seg.dtype == np.uint8 and seg.shape == sitk.GetArrayFromImage(img).shape
        assert set(np.unique(seg)) <= {0, 1, 2}  # the ignore label is never predicted
    # a scan on another grid (size, spacing, non-identity direction) comes back on ITS grid
    arr = sitk.GetArrayFromImage(sitk.ReadImage(str(trained["cases"][0].image)))[:6, :40, :44]
    other = sitk.GetImageFromArray(arr)
    other.SetSpacing((1.5, 2.5, 4.0))
    other.SetOrigin((10.0, -5.0, 3.0))
    flipped_dir = sitk.DICOMOrient(other, "RAS")
    for im in (other, flipped_dir):
        out = pred.predict_image(im)
        assert out.GetSize() == im.GetSize() and out.GetSpacing() == im.GetSpacing()
        assert out.GetDirection() == im.GetDirection() and out.GetOrigin() == im.GetOrigin()
    assert n0 + 1 == nn.PREDICTOR_LOADS  # several predictions, one load


def test_prediction_is_not_flip_symmetrised(trained):
    """Mirror TTA would make logits exactly flip-equivariant; ours must not be."""
    import torch

    pred = nn.Predictor.load(trained["info"].model_dir)
    p = pred._p
    x = torch.from_numpy(np.random.default_rng(0).normal(size=(1, 4, *p.configuration_manager.patch_size)))
    x = x.float()
    flip = (-1,)  # left-right axis of the [c, z, y, x] tensor

    def logits(t):
        with torch.inference_mode():
            return p.predict_sliding_window_return_logits(t).float()

    ours = (logits(x) - torch.flip(logits(torch.flip(x, flip)), flip)).abs().max().item()
    assert ours > 0.1
    p.use_mirroring, p.allowed_mirroring_axes = True, (0, 1)  # what nnU-Net's default would do
    try:
        tta = (logits(x) - torch.flip(logits(torch.flip(x, flip)), flip)).abs().max().item()
    finally:
        p.use_mirroring, p.allowed_mirroring_axes = False, None
    # TTA is equivariant up to float noise (~0.5 % here); ours differs by the full logit scale
    assert tta < 0.05 * ours


@pytest.mark.parametrize(
    ("profile_says", "device", "env", "compiles"),
    [
        (False, "cuda", None, False),  # the quick profile: never, whatever nnU-Net's default
        (False, "cuda", "t", False),
        (True, "cuda", "f", True),
        (None, "cuda", None, True),  # the paper profile: nnU-Net's default on CUDA ...
        (None, "cuda", "f", False),  # ... which its env var can turn off
        (True, "cpu", None, False),  # nnU-Net never compiles on CPU
    ],
)
def test_the_profile_decides_whether_the_network_is_compiled_on_cuda(profile_says, device, env, compiles):
    import torch

    from nnsam2_assets.refinement.nnunet._common import _env_override

    cls = nn.trainer_class()
    trainer = cls.__new__(cls)  # the rule only, no CUDA needed
    trainer.compile_network, trainer.device = profile_says, torch.device(device)
    with _env_override({"nnUNet_compile": env}):
        assert trainer._do_i_compile() is compiles


def test_the_quick_profile_never_compiles_and_the_paper_profile_keeps_nnunets_default():
    assert (
        nn.get_profile("quick").compile_network is False and nn.get_profile("paper").compile_network is None
    )


def test_a_warm_start_from_a_gpu_checkpoint_loads_on_a_machine_without_one(tmp_path):
    """nnU-Net saves weights on the device they trained on and loads a warm start without ``map_location``:
    stage 1 trained on a GPU failed stage 2's warm start on a CPU machine. The checkpoint here is a CPU one
    whose tensors are labelled ``cuda:0`` in its pickle, as a GPU-trained file's are."""
    import zipfile

    import torch
    from nnunetv2.run.load_pretrained_weights import load_pretrained_weights

    from nnsam2_assets.refinement.nnunet.train import loadable_here

    trained, fresh = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    cpu_file, gpu_file = tmp_path / "cpu.pth", tmp_path / "checkpoint_final.pth"
    torch.save({"network_weights": trained.state_dict()}, cpu_file)
    with zipfile.ZipFile(cpu_file) as source, zipfile.ZipFile(gpu_file, "w") as target:
        for name in source.namelist():
            data = source.read(name)
            if name.endswith("data.pkl"):
                data = data.replace(b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:0")
            target.writestr(name, data)
    if not torch.cuda.is_available():  # the failure this guards against, on this machine
        with pytest.raises(RuntimeError, match="CUDA"):
            load_pretrained_weights(fresh, str(gpu_file))
    with loadable_here(gpu_file) as checkpoint:
        load_pretrained_weights(fresh, str(checkpoint))
    assert torch.equal(fresh.weight, trained.weight) and torch.equal(fresh.bias, trained.bias)


def test_a_published_model_is_on_disk_before_its_folder_takes_the_models_name(tmp_path, monkeypatch):
    """The model's files were copied and its record written, then the folder renamed into place without a
    flush: after a crash the folder could stand complete in name with empty files, and a model is reused by
    its name alone, so every later run failed to load it."""
    import time
    from types import SimpleNamespace

    from nnsam2_assets.refinement.nnunet import train

    out_base = tmp_path / "results"
    (out_base / "fold_all").mkdir(parents=True)
    (out_base / "plans.json").write_text("{}")
    (out_base / "fold_all" / "checkpoint_final.pth").write_bytes(b"weights")
    model_dir = tmp_path / "models" / "v1"
    flushed: list[Path] = []
    fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        assert not model_dir.exists()  # every flush comes before the folder is published
        flushed.append(Path(os.readlink(f"/proc/self/fd/{fd}")))
        fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(train, "ModelInfo", lambda **_: SimpleNamespace(to_json=lambda: "{}"))
    train._publish_model(out_base, "all", model_dir, {}, time.perf_counter())
    published = {p.name for p in model_dir.rglob("*")}
    assert published == {"plans.json", "fold_all", "checkpoint_final.pth", nn.MODEL_INFO_FILE}
    assert published <= {p.name for p in flushed}
    assert any(p.name.startswith(".tmp-v1-") for p in flushed)  # the folder itself, before its rename
