"""Building SAM2 models: the one place that imports ``sam2`` safely and names a model by its weights.

Three stages use SAM2: propagation (the video predictor), refinement (nnSAM's frozen image encoder) and
supervoxels (the automatic mask generator). They share this module so the Hydra shim, the input-size
overrides and the model identity (config, checkpoint digest, input size) are written once.

Importing this module installs the Hydra shim; import it before anything from ``sam2``.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from nnsam2_assets.core.storage import sha256_file

# Hydra 1.4 rejects sam2/__init__'s initialize_config_module(version_base="1.2"); pre-initialise Hydra on sam2's
# package dir WITHOUT importing sam2, so sam2/__init__ skips its own init (docs/install.md, "SAM2 on CPU").
if not GlobalHydra.instance().is_initialized():
    _spec = importlib.util.find_spec("sam2")
    if _spec is None or not _spec.submodule_search_locations:
        raise ImportError("sam2 is not installed (pip install --no-deps sam2==1.1.0, see docs/install.md)")
    initialize_config_dir(config_dir=_spec.submodule_search_locations[0], job_name="sam2")
warnings.filterwarnings("ignore", message=r"hydra\.utils\.instantiate\(\) resolved")

DEFAULT_CONFIG = "configs/sam2.1/sam2.1_hiera_t.yaml"
# SAM2's image encoder downsamples its input 16-fold for the embedding the decoders read
EMBEDDING_STRIDE = 16


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


# Hiera tiles its 8 x 8 window position embedding over the stride-4 patch grid: a size that is a multiple of 16
# but not of 32 (48, 80, 112, ...) failed at the first forward pass, after the chain before it had run
IMAGE_SIZE_MULTIPLE = 32


def checked_image_size(image_size: int) -> int:
    if image_size <= 0 or image_size % IMAGE_SIZE_MULTIPLE:
        raise ValueError(f"image_size must be a positive multiple of {IMAGE_SIZE_MULTIPLE}, got {image_size}")
    return int(image_size)


def checked_checkpoint(
    checkpoint: str | os.PathLike | None, allow_random_weights: bool, who: str
) -> Path | None:
    """The checkpoint path, or None for random weights where the caller allowed them (tests, benchmarks)."""
    if checkpoint is None or str(checkpoint) == "":
        if not allow_random_weights:
            raise ValueError(
                f"{who} needs a SAM2 checkpoint (e.g. sam2.1_hiera_tiny.pt matching the config); without one the "
                "weights are RANDOM and the output meaningless. Pass allow_random_weights=True only in tests and "
                "benchmarks."
            )
        return None
    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"SAM2 checkpoint not found: {path}")
    return path


def checkpoint_digest(checkpoint: Path) -> str:
    """The checkpoint's sha256, read once per process while its size and mtime stay (a run asks per step)."""
    stat = Path(checkpoint).stat()
    return _digest(str(Path(checkpoint).resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _digest(path: str, size: int, mtime_ns: int) -> str:
    return sha256_file(Path(path))


def model_id(config: str, checkpoint: Path | None, image_size: int) -> str:
    """``<config stem>:<checkpoint sha256[:12] or 'random'>:<input size>``: what a SAM2 output depends on."""
    tag = checkpoint_digest(checkpoint)[:12] if checkpoint is not None else "random"
    return f"{Path(config).stem}:{tag}:{image_size}"


def size_overrides(image_size: int) -> list[str]:
    """Hydra overrides for an input size other than the config's (memory attention works on the embedding grid)."""
    feat = image_size // EMBEDDING_STRIDE
    return [
        f"++model.image_size={image_size}",
        f"++model.memory_attention.layer.self_attention.feat_sizes=[{feat},{feat}]",
        f"++model.memory_attention.layer.cross_attention.feat_sizes=[{feat},{feat}]",
    ]


def build_image_model(
    config: str, checkpoint: Path | None, image_size: int, device: torch.device, overrides: Sequence[str] = ()
) -> Any:
    """A ``SAM2Base`` in eval mode (image encoder, prompt encoder, mask decoder), weights from ``checkpoint``."""
    from sam2.build_sam import build_sam2

    return build_sam2(
        config,
        ckpt_path=str(checkpoint) if checkpoint is not None else None,
        device=str(device),
        hydra_overrides_extra=[*size_overrides(image_size), *overrides],
    )


def embed_images(model: Any, images: torch.Tensor) -> dict[str, Any]:
    """Backbone features of a batch of [B, 3, S, S] model-normalised images, as SAM2's image predictor keeps them:
    ``image_embed`` [B, 256, S/16, S/16] (with the no-memory embedding added where the model does) and
    ``high_res_feats`` at S/4 and S/8 for the mask decoder."""
    size = images.shape[-1]
    backbone = model.forward_image(images)
    _, vision_feats, _, _ = model._prepare_backbone_features(backbone)
    if model.directly_add_no_mem_embed:
        vision_feats[-1] = vision_feats[-1] + model.no_mem_embed
    sizes = [(size // 4, size // 4), (size // 8, size // 8), (size // 16, size // 16)]
    batch = images.shape[0]
    feats = [f.permute(1, 2, 0).reshape(batch, -1, *hw) for f, hw in zip(vision_feats, sizes, strict=True)]
    return {"image_embed": feats[-1], "high_res_feats": feats[:-1]}


def to_model_input(slices: torch.Tensor, image_size: int) -> torch.Tensor:
    """[B, H, W] intensities scaled to [0, 1] -> [B, 3, S, S] as SAM2 was trained on: grey repeated to RGB,
    resized to the model's input size, normalised with ImageNet's mean and deviation."""
    x = slices[:, None].float().clamp(0, 1).repeat(1, 3, 1, 1)
    x = torch.nn.functional.interpolate(
        x, size=(image_size, image_size), mode="bilinear", align_corners=False
    )
    mean = torch.tensor([0.485, 0.456, 0.406], device=x.device).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std
