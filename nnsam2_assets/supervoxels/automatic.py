"""SAM2's automatic mask generator without torchvision.

``sam2.automatic_mask_generator`` imports torchvision twice: ``batched_nms`` for the duplicate removal, and
through ``SAM2ImagePredictor`` the ``Normalize``/``Resize``/``ToTensor`` transforms. torchvision cannot be
installed beside this torch, so this module does the same work with what is here: the model's own encoders and
decoder (``core.sam2_models``: input scaling and embedding as the image predictor does them), sam2's torch-only
helpers (point grid, stability score, mask boxes) and a greedy box NMS in torch.

Single crop (no crop layers): a lumbar axial slice is one view, and SAM2's input size already covers it.
The nnInteractive SuperVoxel recipe keeps masks with predicted IoU >= 0.92 (``PRED_IOU_THRESHOLD``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

# isort: off
from nnsam2_assets.core import sam2_models  # installs the Hydra shim before anything from sam2
from sam2.utils.amg import batched_mask_to_box, build_point_grid, calculate_stability_score
# isort: on

PRED_IOU_THRESHOLD = 0.92
STABILITY_THRESHOLD = 0.95
STABILITY_OFFSET = 1.0
BOX_NMS_THRESHOLD = 0.7
POINTS_PER_SIDE = 16
POINTS_PER_BATCH = 64


@dataclass(frozen=True)
class CandidateMask:
    mask: np.ndarray  # bool [H, W] on the input slice
    predicted_iou: float
    stability: float

    @property
    def area(self) -> int:
        return int(self.mask.sum())


def box_nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Indices of the boxes (xyxy) greedy non-maximum suppression keeps, best score first."""
    order = torch.argsort(scores, descending=True)
    boxes = boxes.float()
    area = (boxes[:, 2] - boxes[:, 0]).clamp(min=0) * (boxes[:, 3] - boxes[:, 1]).clamp(min=0)
    keep: list[int] = []
    suppressed = torch.zeros(len(boxes), dtype=torch.bool)
    for i in order.tolist():
        if suppressed[i]:
            continue
        keep.append(i)
        top_left = torch.maximum(boxes[i, :2], boxes[:, :2])
        bottom_right = torch.minimum(boxes[i, 2:], boxes[:, 2:])
        inter = (bottom_right - top_left).clamp(min=0).prod(dim=1)
        iou = inter / (area[i] + area - inter).clamp(min=1e-9)
        suppressed |= iou > iou_threshold
    return torch.tensor(keep, dtype=torch.long)


class AutomaticMaskGenerator:
    """Candidate masks of one slice from a grid of single-point prompts. The model is built once here.

    ``checkpoint=None`` gives random weights and is refused unless ``allow_random_weights`` (tests): with
    random weights the default thresholds keep nothing, so the tests lower them.
    """

    def __init__(
        self,
        config: str = sam2_models.DEFAULT_CONFIG,
        checkpoint: str | os.PathLike | None = None,
        image_size: int = 512,
        device: str = "auto",
        allow_random_weights: bool = False,
        points_per_side: int = POINTS_PER_SIDE,
        points_per_batch: int = POINTS_PER_BATCH,
        pred_iou_thresh: float = PRED_IOU_THRESHOLD,
        stability_score_thresh: float = STABILITY_THRESHOLD,
        box_nms_thresh: float = BOX_NMS_THRESHOLD,
        model: Any = None,
    ) -> None:
        path = sam2_models.checked_checkpoint(checkpoint, allow_random_weights, "AutomaticMaskGenerator")
        self.image_size = sam2_models.checked_image_size(image_size)
        self.device = sam2_models.resolve_device(device)
        self.model_id = sam2_models.model_id(config, path, self.image_size)
        # ``model``: one already built from this config and checkpoint (the propagator's video predictor is a
        # SAM2Base with the same encoder and decoders), so a run loads the weights once
        self.model = (
            model
            if model is not None
            else sam2_models.build_image_model(config, path, self.image_size, self.device)
        )
        self.points = build_point_grid(points_per_side)  # [N, 2] (x, y) in [0, 1]
        self.points_per_batch = points_per_batch
        self.pred_iou_thresh = pred_iou_thresh
        self.stability_score_thresh = stability_score_thresh
        self.box_nms_thresh = box_nms_thresh

    @torch.no_grad()
    def generate(self, grey: np.ndarray) -> list[CandidateMask]:
        """Candidates of a [H, W] slice scaled to [0, 1], best predicted IoU first, duplicates suppressed."""
        height, width = grey.shape
        image = sam2_models.to_model_input(
            torch.from_numpy(np.asarray(grey, np.float32))[None], self.image_size
        )
        features = sam2_models.embed_images(self.model, image.to(self.device))
        masks, ious, stabilities = [], [], []
        for start in range(0, len(self.points), self.points_per_batch):
            batch = torch.as_tensor(self.points[start : start + self.points_per_batch] * self.image_size)
            logits, iou = self._predict(features, batch.float().to(self.device))
            logits = F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)
            logits, iou = logits.flatten(0, 1), iou.flatten(0, 1)
            stability = calculate_stability_score(logits, 0.0, STABILITY_OFFSET)
            keep = (iou >= self.pred_iou_thresh) & (stability >= self.stability_score_thresh)
            keep &= (logits > 0).flatten(1).any(dim=1)
            masks.append((logits[keep] > 0).cpu())
            ious.append(iou[keep].cpu())
            stabilities.append(stability[keep].cpu())
        if not masks or sum(len(m) for m in masks) == 0:
            return []
        masks_t, ious_t, stab_t = torch.cat(masks), torch.cat(ious), torch.cat(stabilities)
        kept = box_nms(batched_mask_to_box(masks_t), ious_t, self.box_nms_thresh)
        return [CandidateMask(masks_t[i].numpy(), float(ious_t[i]), float(stab_t[i])) for i in kept.tolist()]

    def _predict(self, features: dict, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Three candidate masks (low-resolution logits) and their predicted IoUs per single positive point."""
        model = self.model
        labels = torch.ones(len(points), 1, dtype=torch.int, device=points.device)
        sparse, dense = model.sam_prompt_encoder(points=(points[:, None, :], labels), boxes=None, masks=None)
        logits, iou, _, _ = model.sam_mask_decoder(
            image_embeddings=features["image_embed"],
            image_pe=model.sam_prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=True,
            repeat_image=True,
            high_res_features=features["high_res_feats"],
        )
        return logits, iou
