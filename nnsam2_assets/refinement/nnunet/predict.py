"""Load-once nnU-Net predictor (never mirrors)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from ._common import MODEL_INFO_FILE, _quiet, log, resolve_device
from .train import ModelInfo

PREDICTOR_LOADS = 0
"""Number of ``Predictor.load`` calls in this process (instrumentation for benchmarks)."""


def _nnsam_network(unet: Any, info: ModelInfo, plans_manager: Any, dataset_json: dict, device: Any) -> Any:
    """nnSAM's network around ``unet``, its frozen encoder built bare: the checkpoint holds all its weights."""
    from .nnsam import NnsamOptions, build_network

    options = NnsamOptions.architecture_of(info.nnsam or {})
    heads = plans_manager.get_label_manager(dataset_json).num_segmentation_heads
    return build_network(unet, heads - 1, options, device, load_weights=False)


class Predictor:
    """A trained model loaded once and reused for many scans. Never mirrors."""

    def __init__(
        self, model_dir: Path, info: ModelInfo, predictor: Any, num_threads: int | None = None
    ) -> None:
        self.model_dir = model_dir
        self.info = info
        self._p = predictor
        self.num_threads = num_threads

    @property
    def use_mirroring(self) -> bool:
        return bool(self._p.use_mirroring)

    @property
    def allowed_mirroring_axes(self) -> Any:
        return self._p.allowed_mirroring_axes

    @classmethod
    def load(cls, model_dir: Path, device: str = "auto", num_threads: int | None = 1) -> Predictor:
        """Load a model folder written by ``train_model`` (refuses incomplete folders).

        ``num_threads``: torch threads during ``predict`` on CPU (None keeps the process setting). 1 by
        default: 2 threads on 2 shared cores were ~4x slower whenever anything else ran.
        """
        global PREDICTOR_LOADS
        import torch
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
        from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
        from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

        model_dir = Path(model_dir)
        if not (model_dir / MODEL_INFO_FILE).is_file():
            raise FileNotFoundError(
                f"{model_dir} is not a complete nnsam2 nnU-Net model ({MODEL_INFO_FILE} missing)"
            )
        info = ModelInfo.from_dir(model_dir)
        dataset_json = json.loads((model_dir / "dataset.json").read_text())
        plans_manager = PlansManager(json.loads((model_dir / "plans.json").read_text()))
        ckpt = torch.load(info.checkpoint, map_location="cpu", weights_only=False)
        cfg = plans_manager.get_configuration(ckpt["init_args"]["configuration"])
        # build the network without a trainer-name lookup (that needs torchvision in this env)
        network = nnUNetTrainer.build_network_architecture(
            plans_manager,
            cfg,
            determine_num_input_channels(plans_manager, cfg, dataset_json),
            plans_manager.get_label_manager(dataset_json).num_segmentation_heads,
            enable_deep_supervision=False,
        )
        dev = resolve_device(device)
        if info.nnsam is not None:
            network = _nnsam_network(network, info, plans_manager, dataset_json, dev)
        network.load_state_dict(ckpt["network_weights"])
        network.to(dev).eval()
        with _quiet():
            p = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                                perform_everything_on_device=dev.type == "cuda", device=dev, allow_tqdm=False)  # fmt: skip
        p.manual_initialization(network, plans_manager, cfg, [ckpt["network_weights"]], dataset_json,
                                ckpt["trainer_name"], None)  # fmt: skip
        PREDICTOR_LOADS += 1
        log.info(
            "loaded nnU-Net model %s (%s, fold %s) on %s", model_dir, cfg.data_identifier, info.fold, dev
        )
        return cls(model_dir, info, p, num_threads if dev.type == "cpu" else None)

    def predict(self, image: sitk.Image) -> np.ndarray:
        """Segment one 3-D scan; returns uint8 [z, y, x] on the input image's grid."""
        import torch

        if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
            raise ValueError("expected a single-channel 3-D image")
        direction = np.asarray(image.GetDirection())
        canonical = np.allclose(direction, np.eye(3).ravel(), atol=1e-5)
        work = image if canonical else sitk.DICOMOrient(image, "LPS")
        # same axis convention as nnU-Net's SimpleITKIO: array [c, z, y, x], spacing reversed to (z, y, x)
        data = sitk.GetArrayFromImage(work).astype(np.float32)[None]
        props = {"spacing": list(work.GetSpacing())[::-1]}
        old_threads = torch.get_num_threads()
        if self.num_threads:
            torch.set_num_threads(self.num_threads)
        try:
            seg = self._predict_array(work, data, props)
        finally:
            torch.set_num_threads(old_threads)
        if not canonical:
            out = sitk.GetImageFromArray(seg)
            out.CopyInformation(work)
            orient = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(image.GetDirection())
            seg = sitk.GetArrayFromImage(sitk.DICOMOrient(out, orient)).astype(np.uint8)
        return seg

    def _predict_array(self, work: sitk.Image, data: np.ndarray, props: dict) -> np.ndarray:
        import torch
        from nnunetv2.inference.export_prediction import (
            convert_predicted_logits_to_segmentation_with_correct_shape,
        )
        from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor

        p = self._p
        with _quiet():
            data_pp, _, props_pp = DefaultPreprocessor(verbose=False).run_case_npy(
                data, None, props, p.plans_manager, p.configuration_manager, p.dataset_json
            )
            # call the sliding window directly: predict_logits_from_preprocessed_data would pin torch to
            # nnUNet_def_n_proc (=1) threads
            with torch.inference_mode():
                logits = p.predict_sliding_window_return_logits(torch.from_numpy(data_pp)).cpu()
            seg = convert_predicted_logits_to_segmentation_with_correct_shape(
                logits, p.plans_manager, p.configuration_manager, p.label_manager, props_pp
            )
        return np.asarray(seg, dtype=np.uint8)

    def predict_image(self, image: sitk.Image) -> sitk.Image:
        """Like ``predict`` but returns a uint8 image carrying the input's geometry."""
        out = sitk.GetImageFromArray(self.predict(image))
        out.CopyInformation(image)
        return out
