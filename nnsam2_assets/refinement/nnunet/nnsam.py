"""nnSAM (Li et al., "Plug-and-play Segment Anything Model improves nnUNet performance") as a trainer option.

A frozen SAM-family image encoder runs beside nnU-Net's encoder; its embedding is resized to and concatenated
with nnU-Net's features of one encoder level, and the decoder layer that reads that level is widened to take
it. The paper concatenates at ``skips[3]`` (1/8 resolution, MobileSAM's 256-channel embedding); we use the same
level, or the deepest the plan has when it has fewer stages (a 4-stage plan's bottleneck: the first
transposed convolution then reads the concatenation). The quick profile's plan on the TUM crops has 5 stages,
so there ``skips[3]`` is a true skip and the first convolution of decoder stage 0 is widened. The encoder is SAM2's Hiera
image encoder with its FPN neck (256 channels, 1/16 of its input), from the checkpoint the propagation
resource names, built once per training run and never fine-tuned.

The decoder has a second head, a level-set regression (``level_set.py``) trained with a curvature term on the
boundary; only the segmentation head is used at inference. Without a SAM2 checkpoint the option runs the
shape head alone, and the model's record says so (``sam_encoder: "none"``).

Inputs reach the SAM2 encoder as nnU-Net gives them (z-scored per case): ``ZSCORE_WINDOW`` maps z-scores to
the [0, 1] grey range SAM2's frames have, repeated to RGB and normalised as SAM2 was trained.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .level_set import level_set_loss, level_set_targets

TRAINER_NAME = "nnUNetTrainerNnSAMNoMirroring"
# nnSAM concatenates SAM's embedding to nnU-Net's encoder output with index 3 (1/8 resolution)
PAPER_SKIP_LEVEL = 3
# z-scores from -2.5 to 2.5 fill SAM2's grey range; beyond are clipped (fat and air in MR)
ZSCORE_WINDOW = (-2.5, 2.5)


@dataclass(frozen=True)
class NnsamOptions:
    """What an nnSAM model depends on besides its data and plan."""

    level_set_weight: float
    sam2_config: str
    sam2_checkpoint: Path | None  # None: the shape head alone, unless random weights are allowed
    sam2_image_size: int
    random_sam_weights: bool = False  # tests and benchmarks: the encoder's plumbing without a checkpoint

    @property
    def uses_sam_encoder(self) -> bool:
        return self.sam2_checkpoint is not None or self.random_sam_weights

    def encoder_id(self) -> str:
        """The SAM2 encoder's identity (config, checkpoint digest, input size), or "none" for the shape head alone."""
        if not self.uses_sam_encoder:
            return "none"
        from nnsam2_assets.core import sam2_models

        return sam2_models.model_id(self.sam2_config, self.sam2_checkpoint, self.sam2_image_size)

    def record(self, network: NnsamNetwork) -> dict[str, Any]:
        """What a trained model's ``ModelInfo.nnsam`` says of it (``architecture_of`` reads it back)."""
        return {
            "level_set_weight": self.level_set_weight,
            "sam_encoder": self.encoder_id(),
            "sam2_config": self.sam2_config,
            "sam2_image_size": self.sam2_image_size,
            "sam_level": int(network.sam_level) if self.uses_sam_encoder else None,
        }

    @classmethod
    def architecture_of(cls, record: dict[str, Any]) -> NnsamOptions:
        """Options that rebuild a recorded model's network bare (its checkpoint holds every weight, the
        frozen encoder's too), with no SAM2 checkpoint at hand."""
        return cls(
            level_set_weight=float(record["level_set_weight"]),
            sam2_config=str(record["sam2_config"]),
            sam2_checkpoint=None,
            sam2_image_size=int(record["sam2_image_size"]),
            random_sam_weights=record["sam_encoder"] != "none",
        )


class FrozenSam2Encoder(nn.Module):
    """SAM2's image encoder (Hiera trunk and FPN neck), frozen: no gradients, always in eval mode."""

    def __init__(self, image_encoder: nn.Module, image_size: int) -> None:
        super().__init__()
        self.image_encoder = image_encoder
        self.image_size = image_size
        self.channels = int(image_encoder.neck.d_model)
        for parameter in self.image_encoder.parameters():
            parameter.requires_grad = False
        self.image_encoder.eval()

    def train(self, mode: bool = True) -> FrozenSam2Encoder:
        super().train(False)  # dropout and drop-path stay off even while nnU-Net trains
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from nnsam2_assets.core import sam2_models

        low, high = ZSCORE_WINDOW
        with torch.no_grad():
            grey = (x[:, 0].detach() - low) / (high - low)
            return self.image_encoder(sam2_models.to_model_input(grey, self.image_size))["vision_features"]


def build_sam_encoder(
    options: NnsamOptions, device: torch.device, load_weights: bool = True
) -> FrozenSam2Encoder:
    """The frozen encoder; ``load_weights=False`` builds the architecture only (a checkpoint's state fills it)."""
    from nnsam2_assets.core import sam2_models

    checkpoint = options.sam2_checkpoint if load_weights else None
    model = sam2_models.build_image_model(options.sam2_config, checkpoint, options.sam2_image_size, device)
    return FrozenSam2Encoder(model.image_encoder, options.sam2_image_size)


def _he_initialised(module: nn.Module) -> nn.Module:
    """The layers nnSAM adds start as nnU-Net initialises its own."""
    from dynamic_network_architectures.initialization.weight_init import InitWeights_He

    module.apply(InitWeights_He(1e-2))
    return module


def _widened(conv: nn.Module, extra: int) -> nn.Module:
    """A fresh (transposed) convolution like ``conv`` with ``extra`` more input channels."""
    kwargs = dict(
        kernel_size=conv.kernel_size, stride=conv.stride, padding=conv.padding, bias=conv.bias is not None
    )
    return _he_initialised(type(conv)(conv.in_channels + extra, conv.out_channels, **kwargs))


class NnsamNetwork(nn.Module):
    """nnU-Net's plain U-Net with the SAM embedding fused at one level and a level-set head.

    Keeps ``encoder`` and ``decoder`` as attributes so nnU-Net's deep-supervision switch and checkpointing work
    unchanged; ``forward`` returns the segmentation outputs exactly as the plain network does and, while
    training, leaves the level-set maps in ``last_level_set`` for the loss.
    """

    def __init__(self, unet: nn.Module, num_foreground: int, sam_encoder: FrozenSam2Encoder | None) -> None:
        super().__init__()
        self.encoder, self.decoder = unet.encoder, unet.decoder
        self.sam_encoder = sam_encoder
        n_stages = len(self.encoder.output_channels)
        self.sam_level = min(PAPER_SKIP_LEVEL, n_stages - 1)
        if sam_encoder is not None:
            extra = sam_encoder.channels
            if self.sam_level == n_stages - 1:  # the bottleneck: the first transposed convolution reads it
                self.decoder.transpconvs[0] = _widened(self.decoder.transpconvs[0], extra)
            else:  # a skip: the first convolution of the decoder stage that concatenates it
                block = self.decoder.stages[n_stages - 2 - self.sam_level].convs[0]
                block.conv = block.all_modules[0] = _widened(block.conv, extra)
        head_channels = int(self.encoder.output_channels[0])
        self.level_set_head = _he_initialised(
            self.encoder.conv_op(head_channels, num_foreground, 1, 1, 0, bias=True)
        )
        self.last_level_set: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> Any:
        skips = self.encoder(x)
        if self.sam_encoder is not None:
            level = skips[self.sam_level]
            embedding = self.sam_encoder(x)
            embedding = nn.functional.interpolate(
                embedding, size=level.shape[2:], mode="bilinear", align_corners=False
            )
            skips[self.sam_level] = torch.cat((level, embedding), 1)
        outputs, features = self._decode(skips)
        self.last_level_set = torch.tanh(self.level_set_head(features)) if self.training else None
        return outputs

    def _decode(self, skips: list[torch.Tensor]) -> tuple[Any, torch.Tensor]:
        """nnU-Net's ``UNetDecoder.forward``, also returning the full-resolution features the shape head reads."""
        decoder, below, outputs = self.decoder, skips[-1], []
        for s, stage in enumerate(decoder.stages):
            x = stage(torch.cat((decoder.transpconvs[s](below), skips[-(s + 2)]), 1))
            if decoder.deep_supervision:
                outputs.append(decoder.seg_layers[s](x))
            elif s == len(decoder.stages) - 1:
                outputs.append(decoder.seg_layers[-1](x))
            below = x
        outputs = outputs[::-1]
        return (outputs if decoder.deep_supervision else outputs[0]), below


def build_network(
    unet: nn.Module,
    num_foreground: int,
    options: NnsamOptions,
    device: torch.device,
    load_weights: bool = True,
) -> NnsamNetwork:
    encoder = build_sam_encoder(options, device, load_weights) if options.uses_sam_encoder else None
    return NnsamNetwork(unet, num_foreground, encoder).to(device)


class LevelSetAugmentedLoss(nn.Module):
    """nnU-Net's segmentation loss plus ``weight`` times the level-set loss of the network's shape head."""

    def __init__(
        self, segmentation: nn.Module, network: NnsamNetwork, foreground: list[int], ignore_label: int | None,
        weight: float,
    ) -> None:  # fmt: skip
        super().__init__()
        self.segmentation = segmentation
        self.__dict__["network"] = network  # read, not owned: registering it would make it part of the loss
        self.foreground, self.ignore_label, self.weight = foreground, ignore_label, weight

    def forward(self, output: Any, target: Any) -> torch.Tensor:
        loss = self.segmentation(output, target)
        predicted = self.network.last_level_set
        if predicted is None or self.weight <= 0:
            return loss
        full = target[0] if isinstance(target, list | tuple) else target
        predicted, full = as_slices(predicted), as_slices(full)
        wanted, usable = level_set_targets(full, self.foreground, self.ignore_label)
        return loss + self.weight * level_set_loss(predicted, wanted, usable)


def as_slices(maps: torch.Tensor) -> torch.Tensor:
    """[B, C, D, H, W] 3-D patches as [B * D, C, H, W] slices; 2-D batches as they are. The level set is a
    slice's: judged per patch, a 3-D patch of the sparse pseudo-labels (a labelled slice among ignored ones)
    was never usable, and the 3-D profile's shape head trained nothing."""
    if maps.ndim != 5:
        return maps
    b, c, d, h, w = maps.shape
    return maps.permute(0, 2, 1, 3, 4).reshape(b * d, c, h, w)
