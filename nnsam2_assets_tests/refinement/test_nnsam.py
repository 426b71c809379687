"""nnSAM trainer option: the level-set loss on analytic shapes, the network's plumbing with a RANDOM-weight SAM2
encoder on tiny inputs (shapes, the fused level, frozen parameters, one optimiser step), and a tiny real
training and prediction through the nnU-Net wrapper. Plumbing, not accuracy: the weights are random."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet
from torch import nn

from nnsam2_assets.refinement import nnunet
from nnsam2_assets.refinement.nnunet import level_set
from nnsam2_assets.refinement.nnunet.nnsam import (
    PAPER_SKIP_LEVEL,
    LevelSetAugmentedLoss,
    NnsamOptions,
    build_network,
)
from nnsam2_assets_tests.refinement.test_nnunet import CLASSES, _cases

RADIUS = 12.0
SAM_SIZE = 64  # SAM2's input size in these tests: a multiple of 32, tiny on purpose


def _disc(size: int = 64, radius: float = RADIUS) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[:size, :size].astype(float)
    rho = np.hypot(y - size / 2, x - size / 2)
    return rho <= radius, rho - radius  # the mask, and its exact signed distance


# ------------------------------------------------------------------------------------------ level sets
def test_signed_distance_of_a_disc_matches_the_analytic_one():
    mask, exact = _disc()
    phi = level_set.signed_distance(mask)
    assert phi[mask].max() < 0 < phi[~mask].min()  # negative inside, positive outside
    assert np.abs(phi - exact).max() < 0.75
    assert (level_set.signed_distance(np.zeros((4, 4), bool)) > 0).all()
    assert (level_set.signed_distance(np.ones((4, 4), bool)) < 0).all()


def test_curvature_of_a_disc_is_one_over_its_radius():
    mask, exact = _disc()
    rim = np.abs(exact) < 0.5
    bend = level_set.curvature(torch.from_numpy(exact)).numpy()
    assert np.allclose(bend[rim], 1 / RADIUS, rtol=0.05)
    # the pixel mask's distance map: its staircase bends at pixel scale, smoothing leaves the disc's shape
    from_mask = torch.from_numpy(level_set.signed_distance(mask))
    raw = level_set.curvature(from_mask).numpy()[rim]
    smooth = level_set.curvature(level_set.smoothed(from_mask)).numpy()[rim]
    assert np.abs(raw - 1 / RADIUS).mean() > 3 * np.abs(smooth - 1 / RADIUS).mean()
    assert abs(np.median(smooth) - 1 / RADIUS) < 0.2 / RADIUS
    # through the regressed tanh map: a monotone map keeps every level line
    squashed = level_set.curvature(torch.from_numpy(np.tanh(exact / level_set.TAU_PX))).numpy()
    assert np.allclose(squashed[rim], 1 / RADIUS, rtol=0.05)
    _, big = _disc(radius=2 * RADIUS)
    big_bend = level_set.curvature(torch.from_numpy(big)).numpy()[np.abs(big) < 0.5]
    assert np.allclose(big_bend, 1 / (2 * RADIUS), rtol=0.05)  # a disc twice as large bends half as much


def test_level_set_loss_is_zero_for_the_truth_and_grows_with_the_error():
    mask, _ = _disc()
    seg = torch.from_numpy(mask.astype(np.int64) * 2)[None, None]  # class 2 on the disc, 1 absent
    target, usable = level_set.level_set_targets(seg, [1, 2], ignore_label=None)
    assert target.shape == (1, 2, 64, 64) and usable.tolist() == [True]
    assert float(level_set.level_set_loss(target, target, usable)) == pytest.approx(0.0, abs=1e-7)
    shifted = torch.roll(target, 3, dims=-1)
    squared = target.clone()
    squared[:, 1] = torch.from_numpy(np.tanh(level_set.signed_distance(_square()) / level_set.TAU_PX))
    assert float(level_set.level_set_loss(shifted, target, usable)) > 0
    # a square of the disc's area: same regression scale, but the corners carry curvature the disc lacks
    assert float(level_set.level_set_loss(squared, target, usable)) > float(
        torch.mean((squared - target) ** 2)
    )


def _square(size: int = 64) -> np.ndarray:
    half = int(RADIUS * np.sqrt(np.pi) / 2)
    out = np.zeros((size, size), bool)
    out[size // 2 - half : size // 2 + half, size // 2 - half : size // 2 + half] = True
    return out


def test_ignored_samples_do_not_count():
    mask, _ = _disc()
    seg = torch.from_numpy(np.stack([mask, mask]).astype(np.int64))[:, None]
    seg[1, 0, :2] = 3  # an ignored strip: its distances would run through unlabelled tissue
    target, usable = level_set.level_set_targets(seg, [1, 2], ignore_label=3)
    assert usable.tolist() == [True, False]
    noisy = target + 0.5 * torch.randn_like(target)
    assert float(level_set.level_set_loss(noisy, target, torch.tensor([False, False]))) == 0.0


def test_a_3d_patch_trains_the_shape_head_on_its_labelled_slices():
    """The paper profile's 3-D patches hold a labelled slice among ignored ones (the sparse pseudo-labels):
    judged per patch, none was usable, and nnSAM's shape head trained nothing in 3d_fullres."""
    from types import SimpleNamespace

    mask, _ = _disc()
    seg = torch.full((1, 1, 3, *mask.shape), 3, dtype=torch.int64)  # [B, 1, D, H, W], all ignored ...
    seg[0, 0, 1] = torch.from_numpy(mask.astype(np.int64))  # ... but the middle slice
    predicted = torch.zeros((1, 2, 3, *mask.shape), requires_grad=True)
    loss = LevelSetAugmentedLoss(
        lambda output, target: torch.zeros(()), SimpleNamespace(last_level_set=predicted), [1, 2], 3, 1.0
    )(None, seg)
    loss.backward()
    assert float(loss) > 0
    touched = predicted.grad.abs().sum(dim=(0, 1, 3, 4))
    assert touched[1] > 0 and touched[0] == 0 == touched[2]  # the labelled slice alone


# ------------------------------------------------------------------------------------------ network
def _unet(stages: int) -> PlainConvUNet:
    features = [8 * 2**i for i in range(stages)]
    return PlainConvUNet(1, stages, features, nn.Conv2d, 3, [1] + [2] * (stages - 1), 2, 3, 2, conv_bias=True,
                         norm_op=nn.InstanceNorm2d, norm_op_kwargs={"affine": True}, nonlin=nn.LeakyReLU,
                         nonlin_kwargs={"inplace": True}, deep_supervision=True)  # fmt: skip


def _options(random_sam: bool) -> NnsamOptions:
    from nnsam2_assets.core import sam2_models

    return NnsamOptions(0.5, sam2_models.DEFAULT_CONFIG, None, SAM_SIZE, random_sam_weights=random_sam)


@pytest.fixture(scope="module")
def sam_network():
    torch.manual_seed(0)
    return build_network(_unet(4), 2, _options(True), torch.device("cpu"))


def test_sam_embedding_joins_the_deepest_level_a_four_stage_plan_has(sam_network):
    net = sam_network
    assert net.sam_level == 3 == PAPER_SKIP_LEVEL  # the bottleneck of a 4-stage plan is the paper's level
    assert net.decoder.transpconvs[0].in_channels == 64 + net.sam_encoder.channels == 64 + 256
    assert all(not p.requires_grad for p in net.sam_encoder.parameters())


def test_a_five_stage_plan_fuses_into_a_skip_at_the_papers_level():
    torch.manual_seed(0)
    net = build_network(_unet(5), 2, _options(True), torch.device("cpu"))
    assert net.sam_level == PAPER_SKIP_LEVEL
    # decoder stage 0 concatenates skips[3] (64 channels) with the upsampled bottleneck (64) and the embedding
    conv = net.decoder.stages[0].convs[0]
    assert conv.conv is conv.all_modules[0] and conv.conv.in_channels == 64 + 64 + 256
    out = net.train()(torch.randn(2, 1, 32, 32))
    assert out[0].shape == (2, 3, 32, 32)


def test_one_training_step_moves_the_decoder_and_never_the_frozen_encoder(sam_network):
    net = sam_network.train()
    encoder_before = {k: v.clone() for k, v in net.sam_encoder.state_dict().items()}
    head_before = net.level_set_head.weight.detach().clone()
    segmentation = lambda out, tgt: nn.functional.cross_entropy(out[0], tgt[0][:, 0])  # noqa: E731
    loss_fn = LevelSetAugmentedLoss(segmentation, net, [1, 2], None, weight=1.0)
    optimiser = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1)
    x = torch.randn(2, 1, 32, 32)
    target = torch.zeros(2, 1, 32, 32, dtype=torch.long)
    target[:, :, 8:24, 4:14], target[:, :, 8:24, 18:28] = 1, 2
    outputs = net(x)
    assert [o.shape[-1] for o in outputs] == [32, 16, 8]  # deep supervision, as nnU-Net's loss expects
    assert net.last_level_set.shape == (2, 2, 32, 32)
    loss = loss_fn(outputs, [target, target[:, :, ::2, ::2], target[:, :, ::4, ::4]])
    assert float(loss.detach()) > float(segmentation(outputs, [target]).detach())  # the shape term counts
    optimiser.zero_grad()
    loss.backward()
    optimiser.step()
    assert not torch.equal(head_before, net.level_set_head.weight)
    assert all(torch.equal(encoder_before[k], v) for k, v in net.sam_encoder.state_dict().items())
    assert not net.sam_encoder.training  # frozen: eval mode even inside a training network
    net.eval().decoder.deep_supervision = False  # as nnU-Net's predictor runs it
    try:
        assert net(x).shape == (2, 3, 32, 32) and net.last_level_set is None  # the segmentation head only
    finally:
        net.decoder.deep_supervision = True


def test_without_a_checkpoint_the_shape_head_runs_alone():
    options = _options(False)
    assert not options.uses_sam_encoder and options.encoder_id() == "none"
    net = build_network(_unet(4), 2, options, torch.device("cpu"))
    assert net.sam_encoder is None and net.decoder.transpconvs[0].in_channels == 64


def test_trainer_and_its_weights_enter_the_model_identity(tmp_path):
    quick = nnunet.get_profile("quick")
    shape_only = quick.replace(trainer="nnsam")
    assert nnunet.trainer_identity(quick) == "plain"
    assert nnunet.trainer_identity(shape_only).endswith("|none")
    assert nnunet.trainer_identity(shape_only) != nnunet.trainer_identity(
        shape_only.replace(level_set_weight=0.3)
    )
    ckpt_a, ckpt_b = tmp_path / "a.pt", tmp_path / "b.pt"
    ckpt_a.write_bytes(b"weights a")
    ckpt_b.write_bytes(b"weights b")
    with_a = nnunet.trainer_identity(shape_only.replace(sam2_checkpoint=str(ckpt_a)))
    with_b = nnunet.trainer_identity(shape_only.replace(sam2_checkpoint=str(ckpt_b)))
    assert len({with_a, with_b, nnunet.trainer_identity(shape_only)}) == 3
    with pytest.raises(ValueError, match="unknown trainer"):
        quick.replace(trainer="nnsamm")


def test_the_sam2_encoder_is_refused_for_a_3d_configuration_before_anything_runs():
    """The encoder embeds 2-D images: the paper profile's 3d_fullres patches failed on the first training step,
    after ingest, propagation and the pseudo-labels had run."""
    with pytest.raises(
        ValueError, match="nnsam with a SAM2 encoder needs a 2d configuration, not 3d_fullres"
    ):
        nnunet.get_profile("paper", trainer="nnsam", sam2_checkpoint="/weights/sam2.1_hiera_tiny.pt")
    with pytest.raises(ValueError, match="needs a 2d configuration"):
        nnunet.get_profile("paper", trainer="nnsam", sam2_random_weights=True)
    shape_head_only = nnunet.get_profile("paper", trainer="nnsam")
    assert shape_head_only.configuration == "3d_fullres" and not shape_head_only.uses_sam_encoder
    assert nnunet.get_profile("quick", trainer="nnsam", sam2_random_weights=True).uses_sam_encoder


# ------------------------------------------------------------------------------------------ a tiny real run
def test_nnsam_trains_and_predicts_through_the_wrapper(tmp_path):
    cases = _cases(tmp_path / "data", 4, ignore=True)
    profile = nnunet.get_profile(
        "quick", num_epochs=1, iterations_per_epoch=2, val_iterations_per_epoch=1, trainer="nnsam",
        sam2_random_weights=True, sam2_image_size=SAM_SIZE,
    )  # fmt: skip
    info = nnunet.train_model(cases, CLASSES, True, tmp_path / "work", tmp_path / "model", profile, seed=1)
    assert info.trainer_name == "nnUNetTrainerNnSAMNoMirroring"
    assert info.nnsam["sam_encoder"] == f"sam2.1_hiera_t:random:{SAM_SIZE}"
    assert info.nnsam["sam_level"] == 3 and info.nnsam["level_set_weight"] == 0.1
    assert info.seconds_per_iteration > 0
    import SimpleITK as sitk

    predictor = nnunet.Predictor.load(tmp_path / "model", device="cpu")
    image = sitk.ReadImage(str(cases[0].image))
    seg = predictor.predict(image)
    assert seg.shape == sitk.GetArrayFromImage(image).shape and seg.dtype == np.uint8


def test_the_encoder_is_the_one_the_propagation_resource_names(tmp_path):
    from nnsam2_assets.defs.resources import PropagationSettings, build_resources

    checkpoint = tmp_path / "sam2.1_hiera_base_plus.pt"
    checkpoint.write_bytes(b"weights")
    propagation = PropagationSettings(
        sam2_checkpoint=str(checkpoint), sam2_config="configs/sam2.1/sam2.1_hiera_b+.yaml"
    )
    refinement = build_resources(tmp_path, tmp_path, propagation=propagation)["refinement"]
    profile = refinement.model_copy(update={"trainer": "nnsam"}).profile_for(propagation)
    assert (profile.sam2_checkpoint, profile.sam2_config) == (str(checkpoint), propagation.sam2_config)
    assert nnunet.trainer_identity(profile).startswith("nnsam|0.1|sam2.1_hiera_b+:")
    plain = refinement.config().profile_obj()  # the plain trainer carries no encoder settings into its recipe
    assert plain.sam2_checkpoint == "" and nnunet.trainer_identity(plain) == "plain"
