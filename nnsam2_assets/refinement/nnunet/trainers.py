"""Our nnU-Net trainers as named subclasses: the no-mirroring trainer (timing, quiet console, capped rotation)
and nnSAM's on top of it; and the per-iteration progress that the console's bars listen to."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ._common import (
    TRAINER_NAME,
    Profile,
    _env_override,
    log,
)


# ------------------------------------------------------------------------------------------- progress
@dataclass(frozen=True)
class TrainingProgress:
    """Where a training run stands after one training iteration (``training_progress`` listeners get it)."""

    model_dir: Path  # the model folder being trained (its parent's name is the stage)
    iteration: int  # training iterations done, over all epochs
    total_iterations: int
    epoch: int  # the epoch the iteration belongs to, from 1
    num_epochs: int


_PROGRESS_LISTENERS: list[Callable[[TrainingProgress], None]] = []


@contextlib.contextmanager
def training_progress(listener: Callable[[TrainingProgress], None]) -> Iterator[None]:
    """Call ``listener`` after every training iteration of every ``train_model`` in this process while the
    block runs (the console's progress bars). A listener that raises is logged and never stops training."""
    _PROGRESS_LISTENERS.append(listener)
    try:
        yield
    finally:
        _PROGRESS_LISTENERS.remove(listener)


def _notify(progress: TrainingProgress) -> None:
    for listener in list(_PROGRESS_LISTENERS):
        try:
            listener(progress)
        except Exception:  # noqa: BLE001 - a progress display never fails a training run
            log.debug("training progress listener failed", exc_info=True)


# ------------------------------------------------------------------------------------------- trainer
def _unwrapped(network: Any) -> Any:
    """The network itself: torch.compile wraps it on a GPU."""
    return getattr(network, "_orig_mod", network)


class _SeededWorkerLoader:
    """nnU-Net's data loader as one background worker runs it. batchgenerators seeds only numpy's stream in a
    worker; the augmentations also draw from torch's, which a forked worker inherits, the same in every worker."""

    def __init__(self, loader: Any, seeds: Sequence[int]) -> None:
        self.loader = loader
        self.seeds = [int(s) for s in seeds]

    def set_thread_id(self, thread_id: int) -> None:  # batchgenerators calls it first thing in the worker
        import torch

        torch.manual_seed(self.seeds[thread_id])
        self.loader.set_thread_id(thread_id)

    def __iter__(self) -> _SeededWorkerLoader:
        return self

    def __next__(self) -> Any:
        return next(self.loader)


def _seeded_workers(loader: Any, workers: int, seed: int, stream: int, cached: int, pin_memory: bool) -> Any:
    """``loader`` in ``workers`` processes seeded from the training seed (``stream`` keeps the training and
    validation loaders' seeds apart), their batches taken in turn (batchgenerators' deterministic
    ``MultiThreadedAugmenter``, where nnU-Net's takes whichever batch is ready first)."""
    from batchgenerators.dataloading.multi_threaded_augmenter import MultiThreadedAugmenter

    seeds = np.random.SeedSequence([seed, stream]).generate_state(workers).tolist()
    augmenter = MultiThreadedAugmenter(
        _SeededWorkerLoader(loader, seeds), None, workers, cached, seeds=seeds, pin_memory=pin_memory
    )
    next(augmenter)  # starts the workers now, as nnU-Net does
    return augmenter


_TRAINER_CLS: type | None = None
# in-plane rotation augmentation limit: beyond ~90 degrees a rotation swaps the sides (see trainer_class)
MAX_ROTATION_DEG = 15.0


def trainer_class() -> type:
    """``nnUNetTrainer`` subclass: no mirroring, quiet console, timing. Built lazily (imports torch)."""
    global _TRAINER_CLS
    if _TRAINER_CLS is not None:
        return _TRAINER_CLS
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    class _NoMirrorTrainer(nnUNetTrainer):
        # nnU-Net records __init__'s named parameters via locals(): the signature must match exactly
        def __init__(self, plans: dict, configuration: str, fold: int | str, dataset_json: dict,
                     device: Any = None) -> None:  # fmt: skip
            super().__init__(plans, configuration, fold, dataset_json, device)
            self.train_seconds = 0.0
            self.train_iterations = 0
            self.epoch_seconds: list[float] = []
            self._epoch_t0 = 0.0
            self.progress_model_dir: Path | None = None  # set by train_model: progress listeners get it
            self.compile_network: bool | None = None  # set by train_model from the profile
            self.data_seed = 0  # set by train_model: the training seed, which the data workers' seeds follow
            self._iterations_done = 0
            # progress.png is redrawn by matplotlib every epoch (~0.3 s); draw it once at the end instead
            self._plot_progress = self.logger.plot_progress_png
            self.logger.plot_progress_png = lambda *a, **k: None

        def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):  # noqa: N802 (nnU-Net name)
            rot, dummy_2d, initial_patch, _mirror = (
                super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
            )
            # nnU-Net rotates 2d patches (and anisotropic 3d ones, via dummy-2d augmentation) by up to
            # +-180 degrees in plane. A 180-degree rotation maps the patient's right onto the image's left
            # exactly like a mirror, so side-specific labels become unlearnable (class "right" collapsed to
            # Dice 0 in our runs). Cap in-plane rotation at MAX_ROTATION_DEG; recompute the initial patch.
            if max(abs(r) for r in rot) > np.deg2rad(MAX_ROTATION_DEG) + 1e-6:
                from nnunetv2.training.data_augmentation.compute_initial_patch_size import get_patch_size

                rot = (-np.deg2rad(MAX_ROTATION_DEG), np.deg2rad(MAX_ROTATION_DEG))
                patch = self.configuration_manager.patch_size
                dim = len(patch)
                initial_patch = get_patch_size(patch[-dim:], rot, rot, rot, (0.85, 1.25))
                if dummy_2d:
                    initial_patch[0] = patch[0]
            self.inference_allowed_mirroring_axes = None  # saved in the checkpoint
            self.rotation_for_DA_used = rot
            return rot, dummy_2d, initial_patch, None

        def get_dataloaders(self) -> tuple[Any, Any]:
            # nnU-Net's background workers start unseeded and hand over whichever batch is ready first, so a
            # rerun with workers (a GPU's default) trained another model. Build nnU-Net's own loaders, then run
            # them in seeded workers whose batches arrive in a fixed order.
            from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA

            workers = get_allowed_n_proc_DA()
            if workers == 0:
                return super().get_dataloaders()
            with _env_override({"nnUNet_n_proc_DA": "0"}):
                train, val = super().get_dataloaders()
            pin = self.device.type == "cuda"
            return (
                _seeded_workers(train.data_loader, workers, self.data_seed, 0, max(6, workers // 2), pin),
                _seeded_workers(
                    val.data_loader, max(1, workers // 2), self.data_seed, 1, max(3, workers // 4), pin
                ),
            )

        def print_to_log_file(
            self, *args: Any, also_print_to_console: bool = True, add_timestamp: bool = True
        ):
            super().print_to_log_file(*args, also_print_to_console=False, add_timestamp=add_timestamp)
            log.debug("nnunet: %s", " ".join(str(a) for a in args))

        def plot_network_architecture(self) -> None:  # needs hiddenlayer; only produces log noise
            return None

        def _do_i_compile(self) -> bool:
            if self.compile_network is None or self.device.type != "cuda":
                return super()._do_i_compile()
            return self.compile_network

        def on_train_epoch_start(self) -> None:
            super().on_train_epoch_start()
            self._epoch_t0 = time.perf_counter()

        def train_step(self, batch: dict) -> dict:
            out = super().train_step(batch)
            self._iterations_done += 1
            if _PROGRESS_LISTENERS and self.progress_model_dir is not None:
                _notify(
                    TrainingProgress(
                        self.progress_model_dir,
                        self._iterations_done,
                        self.num_epochs * self.num_iterations_per_epoch,
                        self.current_epoch + 1,
                        self.num_epochs,
                    )
                )
            return out

        def on_train_epoch_end(self, train_outputs: list[dict]) -> None:
            self.epoch_seconds.append(time.perf_counter() - self._epoch_t0)
            self.train_seconds += self.epoch_seconds[-1]
            self.train_iterations += len(train_outputs)
            super().on_train_epoch_end(train_outputs)

        def on_epoch_end(self) -> None:
            get = self.logger.get_value
            log.info(
                "nnU-Net epoch %d/%d: train_loss %.4f val_loss %.4f pseudo_dice %s",
                self.current_epoch + 1,
                self.num_epochs,
                get("train_losses", step=-1),
                get("val_losses", step=-1),
                np.round(get("dice_per_class_or_region", step=-1), 3).tolist(),
            )
            super().on_epoch_end()

        def on_train_end(self) -> None:
            super().on_train_end()
            with contextlib.suppress(Exception):  # plotting is cosmetic
                self._plot_progress(self.output_folder)

    _NoMirrorTrainer.__name__ = _NoMirrorTrainer.__qualname__ = TRAINER_NAME
    _TRAINER_CLS = _NoMirrorTrainer
    return _TRAINER_CLS


_NNSAM_TRAINER_CLS: type | None = None


def nnsam_trainer_class() -> type:
    """The no-mirroring trainer with nnSAM's network and loss (``nnsam.py``); ``nnsam_options`` must be set."""
    global _NNSAM_TRAINER_CLS
    if _NNSAM_TRAINER_CLS is not None:
        return _NNSAM_TRAINER_CLS
    from .nnsam import TRAINER_NAME as NNSAM_TRAINER_NAME
    from .nnsam import LevelSetAugmentedLoss, NnsamOptions, build_network

    base = trainer_class()

    class _NnsamTrainer(base):
        nnsam_options: NnsamOptions | None = None

        # an instance method where nnU-Net has a static one: the options live on the trainer
        def build_network_architecture(self, plans_manager: Any, configuration_manager: Any,  # type: ignore[override]
                                       num_input_channels: int, num_output_channels: int,
                                       enable_deep_supervision: bool = True) -> Any:  # fmt: skip
            if self.nnsam_options is None:
                raise RuntimeError("the nnSAM trainer needs nnsam_options before it initialises")
            unet = base.build_network_architecture(plans_manager, configuration_manager, num_input_channels,
                                                   num_output_channels, enable_deep_supervision)  # fmt: skip
            return build_network(unet, num_output_channels - 1, self.nnsam_options, self.device)

        def _build_loss(self) -> Any:
            network = _unwrapped(self.network)
            labels = self.label_manager
            foreground = [int(label) for label in labels.all_labels if label != 0]
            return LevelSetAugmentedLoss(super()._build_loss(), network, foreground, labels.ignore_label,
                                               self.nnsam_options.level_set_weight)  # fmt: skip

    _NnsamTrainer.__name__ = _NnsamTrainer.__qualname__ = NNSAM_TRAINER_NAME
    _NNSAM_TRAINER_CLS = _NnsamTrainer
    return _NNSAM_TRAINER_CLS


def nnsam_options(profile: Profile) -> Any:
    """The nnSAM options a profile names (its trainer must be "nnsam")."""
    from nnsam2_assets.core import sam2_models

    from .nnsam import NnsamOptions

    return NnsamOptions(
        level_set_weight=profile.level_set_weight,
        sam2_config=profile.sam2_config or sam2_models.DEFAULT_CONFIG,
        sam2_checkpoint=Path(profile.sam2_checkpoint) if profile.sam2_checkpoint else None,
        sam2_image_size=sam2_models.checked_image_size(profile.sam2_image_size),
        random_sam_weights=profile.sam2_random_weights and not profile.sam2_checkpoint,
    )


def trainer_identity(profile: Profile) -> str:
    """What the trainer adds to a model's identity beyond the profile's fields: the SAM2 weights' digest."""
    if profile.trainer != "nnsam":
        return profile.trainer
    options = nnsam_options(profile)
    identity = f"nnsam|{options.level_set_weight}|{options.encoder_id()}"
    # a 3-D profile's shape head learns per slice since it learns at all (before, it trained nothing): its
    # earlier models are another recipe; the 2d keys stay as they were
    return identity if profile.configuration == "2d" else f"{identity}|level set per slice"
