"""SAM2 video-predictor propagation backend (``backend="sam2"``); see docs/method.md, "SAM2 confidence".

One annotated reference slice is the ONLY prompt (``add_new_mask`` on frame 0, one object id per class id).
The reference and target volumes are interleaved into two "videos" (see ``propagation/frames.py``): a superior one and
an inferior one, each starting with the prompted reference seed frame and tracked FORWARD from frame 0.
Two forward sequences (rather than one sequence with ``reverse=True``) keep each direction's memory bank free
of frames from the other direction and let both directions see the target seed-level slice right after the
prompt. The target seed-level slice is tracked in both sequences with identical context; we keep the superior
pass's result for it.

Per target frame we keep the mask logits (made non-overlapping as the reference notebooks' ``nolap``: each
pixel goes to the object with the highest positive logit), the decoder's predicted IoU and the object-score
logit. Confidence = predicted IoU gated by presence (object_score_logit > 0 AND non-empty final mask), else 0:
the predicted IoU alone is computed even for absent objects (docs/method.md, "SAM2 confidence").

The predicted IoU is captured by SUBCLASSING ``SAM2VideoPredictor`` (injected with a Hydra ``_target_``
override); site-packages are never edited. torchvision is never imported (no image predictor / transforms).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk
import torch
import torch.nn.functional as F

# isort: off
from nnsam2_assets.core import sam2_models  # installs the Hydra shim before anything from sam2
from sam2.build_sam import build_sam2_video_predictor
from sam2.sam2_video_predictor import SAM2VideoPredictor
# isort: on

from nnsam2_assets.core.masks import clean_class_masks
from nnsam2_assets.ingest.clicks import SliceClicks
from nnsam2_assets.propagation.base import (
    CONFIDENCE_COLUMNS,
    PropagationResult,
    slice_direction,
    target_seed_slice,
)
from nnsam2_assets.propagation.frames import build_frame_sequence, normalise_for_frames, write_frame_stack

DEFAULT_CONFIG = sam2_models.DEFAULT_CONFIG

# Instrumentation for benchmarks/tests: how many SAM2 models this process has built (should be 1 per run).
MODEL_BUILDS = 0
# what the masks depend on besides the weights, the config and the input size (the propagation cache's
# identity); v2: each class's largest component per slice and in 3-D, as the registration backend's
MASKS_VERSION = "sam2-masks-v2"


class SAM2VideoPredictorIoU(SAM2VideoPredictor):
    """SAM2VideoPredictor that keeps the mask decoder's predicted IoU of the mask it actually outputs.

    ``_track_step`` returns the SAM head outputs (element 2 = ious [B, M]) that upstream discards; the best
    candidate is chosen by argmax IoU, so the max is the selected mask's IoU (1.0 on mask-prompted frames,
    where ``_use_mask_as_output`` returns a constant). ``_run_single_frame_inference`` attaches it to the
    compact per-frame output as ``pred_iou`` (a [B] float tensor on the model's device), next to
    ``object_score_logits``. It stays on the device: copying it to the host here would make the CPU wait for
    the GPU in the middle of every frame; it is read once the frame is done.
    """

    _last_pred_iou: torch.Tensor | None = None

    def _track_step(self, *args, **kwargs):
        current_out, sam_outputs, high_res_features, pix_feat = super()._track_step(*args, **kwargs)
        self._last_pred_iou = sam_outputs[2].detach().float().amax(dim=-1)
        return current_out, sam_outputs, high_res_features, pix_feat

    def _run_single_frame_inference(self, *args, **kwargs):
        self._last_pred_iou = None
        compact_out, pred_masks = super()._run_single_frame_inference(*args, **kwargs)
        compact_out["pred_iou"] = self._last_pred_iou
        return compact_out, pred_masks


@contextlib.contextmanager
def _torch_threads(threads: int | None) -> Iterator[None]:
    """Temporarily set torch's intra-op threads (global state), restoring the previous value."""
    if not threads:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(int(threads))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _output_for(state: dict, obj_idx: int, frame_idx: int) -> dict:
    per_obj = state["output_dict_per_obj"][obj_idx]
    out = per_obj["cond_frame_outputs"].get(frame_idx)
    return out if out is not None else per_obj["non_cond_frame_outputs"][frame_idx]


def nolap_labels(logits: torch.Tensor, class_ids: list[int]) -> np.ndarray:
    """[K, H, W] logits -> uint8 [H, W] labels: each pixel to the object with the highest POSITIVE logit.

    Runs on the logits' device, so only the uint8 labels cross to the host."""
    positive = logits > 0
    best = torch.where(positive, logits, torch.full_like(logits, -torch.inf)).argmax(dim=0)
    lut = torch.tensor(class_ids, dtype=torch.uint8, device=logits.device)
    labels = torch.where(positive.any(dim=0), lut[best], torch.zeros_like(best, dtype=torch.uint8))
    return labels.cpu().numpy().astype(np.uint8)


def gate_confidence(predicted_iou: float, object_score: float, area: int) -> tuple[float, bool]:
    """(confidence, present): IoU only counts when the object is present and its final mask is non-empty."""
    present = bool(np.isfinite(object_score) and object_score > 0 and area > 0)
    if not present or not np.isfinite(predicted_iou):
        return 0.0, present
    return float(np.clip(predicted_iou, 0.0, 1.0)), present


class SAM2Propagator:
    """Propagate one annotated reference slice to whole target volumes with the SAM2 video predictor.

    The model is built ONCE here and reused by every ``propagate`` call. ``checkpoint=None`` gives random
    weights and is refused unless ``allow_random_weights=True`` (tests and benchmarks only). ``image_size``
    overrides SAM2's input size (multiple of 32; 512 is the CPU-friendly default, real weights were trained at
    1024). ``threads`` sets torch's CPU threads while building/propagating (None: leave torch's setting).
    ``work_dir``: keep the JPEG frames and frame maps under ``work_dir/<direction>/`` (overwritten per call)
    instead of a temporary folder. Inference is fp32 on every device (no autocast), as the reference.
    """

    backend = "sam2"
    parallel_safe = False  # one model build per run, in the process that owns the device

    def __init__(
        self,
        config: str = DEFAULT_CONFIG,
        checkpoint: str | os.PathLike | None = None,
        image_size: int = 512,
        device: str = "auto",
        allow_random_weights: bool = False,
        threads: int | None = None,
        work_dir: str | os.PathLike | None = None,
        offload_video_to_cpu: bool = False,
    ) -> None:
        global MODEL_BUILDS
        ckpt_path = sam2_models.checked_checkpoint(checkpoint, allow_random_weights, "SAM2Propagator")
        self.config = config
        self.checkpoint = str(ckpt_path) if ckpt_path is not None else None
        self.image_size = sam2_models.checked_image_size(image_size)
        self.device = sam2_models.resolve_device(device)
        self.threads = threads
        self.work_dir = Path(work_dir) if work_dir is not None else None
        self.offload_video_to_cpu = offload_video_to_cpu
        self.model_id = sam2_models.model_id(config, ckpt_path, self.image_size)
        self.last_frame_maps: dict[str, pd.DataFrame] = {}

        overrides = [
            f"++model._target_={SAM2VideoPredictorIoU.__module__}.{SAM2VideoPredictorIoU.__qualname__}",
            *sam2_models.size_overrides(self.image_size),
        ]
        with _torch_threads(threads):
            self.predictor: SAM2VideoPredictorIoU = build_sam2_video_predictor(
                config, ckpt_path=self.checkpoint, device=str(self.device), hydra_overrides_extra=overrides
            )
        if not isinstance(self.predictor, SAM2VideoPredictorIoU):  # the _target_ override must have won
            raise RuntimeError(f"expected SAM2VideoPredictorIoU, hydra built {type(self.predictor).__name__}")
        # apply_postprocessing appends fill_hole_area=8 AFTER our overrides, and hole filling needs the sam2._C
        # CUDA extension we build without: switch it off explicitly (docs/install.md, "SAM2 on CPU").
        self.predictor.fill_hole_area = 0
        MODEL_BUILDS += 1

    # ------------------------------------------------------------------ propagation
    def propagate(
        self,
        reference: sitk.Image,
        annotation: sitk.Image,
        seed_slice: int,
        target: sitk.Image,
        modality: str,
        frames_dir: Path | None = None,
        clicks: SliceClicks | None = None,
    ) -> PropagationResult:
        """``frames_dir`` (else ``work_dir``, else a temporary folder) receives the JPEG frames and frame maps
        that SAM2 reads, one sub-folder per direction. With ``clicks`` (on ``seed_slice``), each class is
        prompted with its positive and negative points (``add_new_points_or_box``) instead of its mask."""
        ref = sitk.GetArrayFromImage(reference)
        tgt = sitk.GetArrayFromImage(target)
        ann = sitk.GetArrayFromImage(annotation)
        if ref.ndim != 3 or tgt.ndim != 3:
            raise ValueError(f"reference/target must be 3-D, got {ref.shape} and {tgt.shape}")
        if ann.shape != ref.shape:
            raise ValueError(f"annotation shape {ann.shape} != reference shape {ref.shape}")
        if not 0 <= seed_slice < ref.shape[0]:
            raise ValueError(f"seed_slice {seed_slice} outside the reference's {ref.shape[0]} slices")
        seed_mask = ann[seed_slice]
        class_ids = [int(c) for c in np.unique(seed_mask) if c != 0]
        if not class_ids:
            raise ValueError(f"annotation slice {seed_slice} is empty: nothing to propagate")
        if len(class_ids) > 255 or max(class_ids) > 255:
            raise ValueError("class ids must fit in uint8")
        if clicks is not None and clicks.slice != seed_slice:
            raise ValueError(f"the clicks lie on slice {clicks.slice}, the annotation on {seed_slice}")

        n_ref, n_tgt = ref.shape[0], tgt.shape[0]
        t_seed = int(target_seed_slice(seed_slice, n_ref, n_tgt))
        sequences = build_frame_sequence(
            normalise_for_frames(ref, modality),
            normalise_for_frames(tgt, modality),
            seed_slice,
            target_seed=t_seed,
            ref_scan="reference",
            tgt_scan="target",
        )
        self.last_frame_maps = {d: s.frame_map for d, s in sequences.items()}

        tgt_hw = tuple(tgt.shape[1:])
        masks = np.zeros(tgt.shape, dtype=np.uint8)
        per_slice: dict[int, tuple[list[float], list[float]]] = {}
        with contextlib.ExitStack() as stack:
            stack.enter_context(_torch_threads(self.threads))
            stack.enter_context(torch.inference_mode())
            root = (
                Path(frames_dir)
                if frames_dir is not None
                else self.work_dir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="nnsam2-")))
            )
            for direction, seq in sequences.items():
                folder = root / direction
                write_frame_stack(seq, folder)
                roles = seq.frame_map["role"].to_numpy()
                slices = seq.frame_map["slice"].to_numpy()
                state = self.predictor.init_state(str(folder), offload_video_to_cpu=self.offload_video_to_cpu)
                try:
                    for cid in class_ids:  # prompt ONLY the reference seed frame (frame 0 of each sequence)
                        if clicks is None:
                            self.predictor.add_new_mask(state, 0, cid, torch.from_numpy(seed_mask == cid))
                            continue
                        points, labels = clicks.for_class(cid)
                        scale = np.array(seq.frames[0].shape[::-1], np.float32) / ref.shape[:0:-1]
                        self.predictor.add_new_points_or_box(
                            state, 0, cid, points=points * scale, labels=labels
                        )
                    for frame_idx, obj_ids, video_res_masks in self.predictor.propagate_in_video(state):
                        if roles[frame_idx] != "target":
                            continue
                        z = int(slices[frame_idx])
                        if z in per_slice:  # target seed level: already taken from the superior pass
                            continue
                        logits = video_res_masks[:, 0].float().clone()  # never mutate sam2-owned tensors
                        if tuple(logits.shape[-2:]) != tgt_hw:  # frames were stretched to a common square
                            logits = F.interpolate(logits[None], size=tgt_hw, mode="bilinear")[0]
                        ious, scores = [], []
                        for obj_idx, _ in enumerate(obj_ids):
                            out = _output_for(state, obj_idx, frame_idx)
                            score = float(out["object_score_logits"].reshape(-1)[0])
                            iou = out.get("pred_iou")
                            ious.append(float(iou.reshape(-1)[0]) if iou is not None else float("nan"))
                            scores.append(score)
                            if score <= 0:  # sam2 already empties absent objects; keep that explicit
                                logits[obj_idx] = -torch.inf
                        masks[z] = nolap_labels(logits, [int(o) for o in obj_ids])
                        per_slice[z] = (ious, scores)
                finally:
                    self.predictor.reset_state(state)
                    del state

        missing = sorted(set(range(n_tgt)) - set(per_slice))
        if missing:  # cannot happen by construction (every target slice is in one direction); guard anyway
            raise RuntimeError(f"SAM2 propagation produced no output for target slices {missing}")
        # each class one piece per slice and in 3-D, as the registration backend leaves its masks: a track that
        # jumps or leaks onto the other side keeps a high predicted IoU, and pseudo-label selection would take
        # that slice as an exact training label
        masks = clean_class_masks(masks, max(class_ids))
        # propagating onto the reference itself: its annotated slice is known exactly, as registration has it
        # (SAM2's track there is logits upsampled from a quarter of the frame, not what the annotator drew)
        own_seed = tgt.shape == ref.shape and np.array_equal(tgt[t_seed], ref[seed_slice])
        if own_seed:
            masks[t_seed] = seed_mask
        confidence = self._confidence_table(masks, per_slice, class_ids, t_seed)
        if own_seed:
            at_seed = confidence["slice"] == t_seed
            confidence.loc[at_seed, "confidence"] = 1.0
            confidence.loc[at_seed, "present"] = True
        return PropagationResult(
            masks=masks, confidence=confidence, backend=self.backend, model_id=self.model_id
        )

    @staticmethod
    def _confidence_table(
        masks: np.ndarray,
        per_slice: dict[int, tuple[list[float], list[float]]],
        class_ids: list[int],
        t_seed: int,
    ) -> pd.DataFrame:
        rows = []
        for z in range(masks.shape[0]):
            ious, scores = per_slice[z]
            direction = slice_direction(z, t_seed)
            for k, cid in enumerate(class_ids):
                area = int(np.count_nonzero(masks[z] == cid))
                conf, present = gate_confidence(ious[k], scores[k], area)
                rows.append(
                    {
                        "slice": z,
                        "class_id": cid,
                        "confidence": conf,
                        "predicted_iou": ious[k],
                        "object_score": scores[k],
                        "present": present,
                        "area": area,
                        "direction": direction,
                        "distance": abs(z - t_seed),
                    }
                )
        df = pd.DataFrame(rows, columns=CONFIDENCE_COLUMNS)
        return df.astype(
            {
                "slice": "int64",
                "class_id": "int64",
                "confidence": "float64",
                "predicted_iou": "float64",
                "object_score": "float64",
                "present": "bool",
                "area": "int64",
                "direction": "object",
                "distance": "int64",
            }
        )
