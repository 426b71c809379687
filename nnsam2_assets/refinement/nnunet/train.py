"""Plan/preprocess, the no-mirroring trainer, and ``train_model`` with atomic publishing."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ._common import (
    MODEL_INFO_FILE,
    PLANS_NAME,
    TRAINER_NAME,
    Profile,
    _env_override,
    _in_process_pools,
    _quiet,
    get_profile,
    log,
    nnunet_env,
    resolve_device,
)
from .raw import RawDataset, TrainingCase, write_raw_dataset


def _quick_2d_plan(planner: Any, plans: dict, profile: Profile) -> dict:
    """Re-plan the 2d configuration at a coarse in-plane spacing with capped patch, batch size and width."""
    fp = planner.dataset_fingerprint
    tf = plans["transpose_forward"]
    spacings = np.asarray(fp["spacings"], dtype=float)[:, tf]  # [n, 3] in transposed order
    shapes = np.asarray(fp["shapes_after_crop"], dtype=float)[:, tf]
    median_inplane = np.median(spacings[:, 1:], 0)
    # never resample finer than the data: small/coarse volumes keep their native spacing
    target = np.maximum(median_inplane, profile.target_inplane_spacing_mm or 0.0)
    new_shapes = shapes[:, 1:] * spacings[:, 1:] / target
    median_shape = np.median(new_shapes, 0)
    n_vox = float(np.prod(median_shape) * np.median(shapes[:, 0]) * len(shapes))
    if profile.base_features:
        planner.UNet_base_num_features = profile.base_features
    cap = profile.max_patch or 10**6
    limit = cap
    for _ in range(16):
        capped = np.minimum(median_shape, limit)
        plan = planner.get_plans_for_configuration(
            target, capped, planner.generate_data_identifier("2d"), n_vox, {}
        )
        if max(plan["patch_size"]) <= cap:
            break
        limit -= 8  # the planner pads the patch to a multiple of 2**n_pool; shrink until it fits
    plan["batch_dice"] = True
    if profile.max_batch:
        plan["batch_size"] = int(min(plan["batch_size"], profile.max_batch))
    return plan


# foreground intensities sampled per training case for the fingerprint (nnU-Net's own per-case default)
FINGERPRINT_SAMPLES_PER_CASE = 10_000


def fingerprint_extractor_class() -> type:
    """nnU-Net's dataset fingerprint, drawing ``FINGERPRINT_SAMPLES_PER_CASE`` foreground intensities per case.

    nnU-Net draws 10^8 samples over the whole dataset whatever its size: for a pool of a few small cases that is
    10^7 or more per case, hundreds of MB and seconds of sorting for every stage. The intensity statistics only
    feed CT normalisation, which the pooled models never use (each case is z-scored on its own), so a smaller
    sample changes no plan and no model.
    """
    from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import (
        DatasetFingerprintExtractor,
    )

    class SampledFingerprintExtractor(DatasetFingerprintExtractor):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.num_foreground_voxels_for_intensitystats = FINGERPRINT_SAMPLES_PER_CASE * len(self.dataset)

    return SampledFingerprintExtractor


def plan_and_preprocess(raw: RawDataset, preprocessed_root: Path, profile: Profile) -> dict:
    """Fingerprint, plan (rewritten for the quick profile) and preprocess one configuration in-process.

    Must run inside ``nnunet_env`` with nnUNet_raw = ``raw.folder.parent``. Returns the plans dict.
    """
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (
        extract_fingerprint_dataset,
        plan_experiment_dataset,
        preprocess,
    )
    from nnunetv2.utilities.json_export import recursive_fix_for_json_export

    # the planner calls torch.set_num_threads(nnUNet_n_proc_DA) while sizing networks; 0 is rejected there
    with _quiet(), _in_process_pools(), _env_override({"nnUNet_n_proc_DA": "1"}):
        extract_fingerprint_dataset(raw.dataset_id, fingerprint_extractor_class(), num_processes=1,
                                    check_dataset_integrity=False, clean=True, verbose=False,
                                    show_progress_bar=False)  # fmt: skip
        from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import (
            ExperimentPlanner,
        )

        plans, _ = plan_experiment_dataset(raw.dataset_id, ExperimentPlanner)
        if profile.rewrites_plan:  # a 2d profile: ``Profile`` refuses the others
            planner = ExperimentPlanner(raw.dataset_id)
            planner.dataset_fingerprint = json.loads(
                (Path(preprocessed_root) / raw.name / "dataset_fingerprint.json").read_text()
            )
            plans["configurations"]["2d"] = _quick_2d_plan(planner, plans, profile)
            recursive_fix_for_json_export(plans)
            (Path(preprocessed_root) / raw.name / f"{PLANS_NAME}.json").write_text(
                json.dumps(plans, indent=1)
            )
        if profile.configuration not in plans["configurations"]:
            raise ValueError(f"nnU-Net planned no {profile.configuration!r} configuration for {raw.name}")
        preprocess([raw.dataset_id], PLANS_NAME, [profile.configuration], [1], verbose=False,
                   show_progress_bar=False)  # fmt: skip
    return plans


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
    return f"nnsam|{options.level_set_weight}|{options.encoder_id()}"


# ------------------------------------------------------------------------------------------- sampling
def centre_foreground_on(
    points: dict[str, dict[int, np.ndarray] | None], preprocessed: Path, case_ids: dict[str, str], plans: dict,
    configuration: str,
) -> None:  # fmt: skip
    """Rewrite each case's ``class_locations`` (the voxels nnU-Net centres oversampled patches on) with the given
    points, mapped as nnU-Net's preprocessing moved the case: transposed, cropped to its non-zero box, resampled.
    A class without points keeps nnU-Net's own locations, so no class stops being oversampled."""
    import pickle

    from nnunetv2.preprocessing.resampling.default_resampling import compute_new_shape

    config = plans["configurations"][configuration]
    transpose = list(plans["transpose_forward"])
    folder = preprocessed / config["data_identifier"]
    for case, by_class in points.items():
        if not by_class:
            continue
        pkl = folder / f"{case_ids[case]}.pkl"
        properties = pickle.loads(pkl.read_bytes())
        spacing = [properties["spacing"][i] for i in transpose]
        target = list(config["spacing"])
        if len(target) < len(spacing):  # 2d: slices keep their spacing
            target = [spacing[0], *target]
        cropped = np.asarray(properties["shape_after_cropping_and_before_resampling"], float)
        shape = np.asarray(compute_new_shape(cropped, spacing, target))
        scale = shape / cropped
        low = np.asarray([b[0] for b in properties["bbox_used_for_cropping"]], float)
        for label, zyx in by_class.items():
            if not len(zyx):
                continue
            moved = (np.asarray(zyx, float)[:, transpose] - low) * scale
            moved = np.clip(np.floor(moved), 0, shape - 1).astype(np.int64)
            properties["class_locations"][int(label)] = np.concatenate(
                [np.zeros((len(moved), 1), np.int64), moved], axis=1
            )
        pkl.write_bytes(pickle.dumps(properties))


# ------------------------------------------------------------------------------------------- training
@dataclass(frozen=True)
class WarmStart:
    """Start from another model's weights (all but the segmentation layers) and train ``num_epochs``."""

    checkpoint: Path
    num_epochs: int


@dataclass(frozen=True)
class ModelInfo:
    model_dir: Path
    configuration: str
    fold: str
    trainer_name: str
    profile: str
    class_names: list[str]
    use_ignore: bool
    num_training_cases: int
    num_epochs: int
    iterations_per_epoch: int
    seed: int
    device: str
    patch_size: list[int]
    batch_size: int
    spacing: list[float]
    train_seconds: float  # training loop only (incl. per-epoch validation)
    total_seconds: float  # dataset writing + plan/preprocess + training + publishing
    seconds_per_iteration: float  # training iteration incl. data loading/augmentation
    # each epoch's training iterations; on CUDA the first also holds torch.compile's compilation
    epoch_seconds: list[float] = field(default_factory=list)
    final_train_loss: float | None = None
    final_val_loss: float | None = None
    pseudo_dice: list[float] = field(default_factory=list)  # per class, last epoch (train cases, fold "all")
    case_ids: dict[str, str] = field(default_factory=dict)
    # nnsam models: level_set_weight, sam_encoder (a SAM2 model id, or "none": the shape head alone),
    # sam2_config, sam2_image_size, sam_level (the encoder level the embedding joins)
    nnsam: dict[str, Any] | None = None
    # the network's width per encoder stage (the profile's ``base_features`` sets the first); empty in
    # records written before it was kept
    features_per_stage: list[int] = field(default_factory=list)
    # the checkpoint whose weights training started from (``WarmStart``); None: a fresh start
    warm_started_from: str | None = None

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        d["model_dir"] = str(self.model_dir)
        return json.dumps(d, indent=2)

    @classmethod
    def from_dir(cls, model_dir: Path) -> ModelInfo:
        d = json.loads((Path(model_dir) / MODEL_INFO_FILE).read_text())
        d["model_dir"] = Path(model_dir)
        return cls(**d)


def _load_warm_start(trainer: Any, warm_start: WarmStart | None) -> str | None:
    """Load ``warm_start``'s weights into the trainer's network; the checkpoint loaded, or None where there is
    none or its network is another one (nnU-Net checks every layer's name and shape)."""
    if warm_start is None:
        return None
    from nnunetv2.run.load_pretrained_weights import load_pretrained_weights

    fresh_epochs = trainer.num_epochs
    # initialize() builds the network and the optimiser with its poly schedule over num_epochs, from the
    # trainer's settings, so it runs once they are all set; run_training then skips it, as in nnU-Net's entry
    trainer.num_epochs = warm_start.num_epochs
    trainer.initialize()
    try:
        with _quiet():
            load_pretrained_weights(trainer.network, str(warm_start.checkpoint))
    except AssertionError as exc:  # nnU-Net checks every layer before it copies any
        log.warning("warm start from %s skipped, training fresh: %s", warm_start.checkpoint, exc)
        trainer.num_epochs = fresh_epochs
        trainer.optimizer, trainer.lr_scheduler = trainer.configure_optimizers()
        return None
    return str(warm_start.checkpoint)


def _seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed)  # nnU-Net's data loader and augmentations draw from numpy's global RNG
    torch.manual_seed(seed)


def _finite(x: Any) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError, IndexError):
        return None
    return v if np.isfinite(v) else None


def _publish(staged: Path, model_dir: Path) -> None:
    """Atomically replace ``model_dir`` with ``staged`` (same filesystem)."""
    old = None
    if model_dir.exists():
        old = model_dir.with_name(f".old-{model_dir.name}-{os.getpid()}-{time.time_ns()}")
        os.replace(model_dir, old)
    os.replace(staged, model_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _unwrapped(network: Any) -> Any:
    """The network itself: torch.compile wraps it on a GPU."""
    return getattr(network, "_orig_mod", network)


def train_model(
    cases: Sequence[TrainingCase],
    class_names: Sequence[str],
    use_ignore: bool,
    work_root: Path,
    model_dir: Path,
    profile: Profile | str = "quick",
    dataset_id: int = 501,
    seed: int = 0,
    fold: int | str = "all",
    sampling_points: dict[str, dict[int, np.ndarray] | None] | None = None,
    warm_start: WarmStart | None = None,
) -> ModelInfo:
    """Write the raw dataset, plan, preprocess and train one nnU-Net; publish it atomically at ``model_dir``.

    ``work_root`` holds nnU-Net's raw/preprocessed/results trees for this call (reused/overwritten).
    ``fold`` defaults to "all" (pseudo-label stages train on every case); an integer fold with fewer than
    5 cases falls back to "all". ``model_dir`` only ever appears complete, with ``nnsam2_model.json``.
    ``sampling_points`` {case id: {class: [N, 3] (z, y, x) on the case's image}} replace the foreground
    locations nnU-Net draws its oversampled patch centres from (a case given None keeps its own).
    ``warm_start`` starts from a checkpoint's weights for its own number of epochs; where this plan's network
    does not match the checkpoint's (another patch size, so another depth), training starts fresh for the
    profile's epochs and the model's record says so (``warm_started_from`` None).
    """
    import torch

    t_start = time.perf_counter()
    prof = get_profile(profile) if isinstance(profile, str) else profile
    work_root, model_dir = Path(work_root), Path(model_dir)
    if fold != "all" and len(cases) < 5:
        log.warning("fold %s needs >= 5 cases (got %d); training fold 'all'", fold, len(cases))
        fold = "all"
    raw_root, pre_root = work_root / "nnUNet_raw", work_root / "nnUNet_preprocessed"
    res_root = work_root / "nnUNet_results"
    for p in (raw_root, pre_root, res_root):
        p.mkdir(parents=True, exist_ok=True)
    raw = write_raw_dataset(raw_root, dataset_id, "nnsam2", cases, class_names, use_ignore)
    device = resolve_device(prof.device)
    old_threads = torch.get_num_threads()
    if prof.num_threads:
        torch.set_num_threads(prof.num_threads)
    try:
        workers = prof.data_workers
        if workers is None:
            workers = 0 if device.type != "cuda" else max(1, min(8, (os.cpu_count() or 2) - 2))
        with nnunet_env(raw_root, pre_root, res_root), _env_override({"nnUNet_n_proc_DA": str(workers)}):
            # a previous run in this work_root must not leak files (logs, checkpoints) into this model
            shutil.rmtree(pre_root / raw.name, ignore_errors=True)
            shutil.rmtree(res_root / raw.name, ignore_errors=True)
            plan_and_preprocess(raw, pre_root, prof)
            plans = json.loads((pre_root / raw.name / f"{PLANS_NAME}.json").read_text())
            if sampling_points:
                centre_foreground_on(
                    sampling_points, pre_root / raw.name, raw.case_ids, plans, prof.configuration
                )
            plans["continue_training"] = False  # 2.8.x __init__ pops this key (KeyError otherwise)
            dataset_json = json.loads((pre_root / raw.name / "dataset.json").read_text())
            _seed_everything(seed)
            cls = nnsam_trainer_class() if prof.trainer == "nnsam" else trainer_class()
            with _quiet():
                trainer = cls(plans=plans, configuration=prof.configuration, fold=fold,
                              dataset_json=dataset_json, device=device)  # fmt: skip
            if prof.trainer == "nnsam":
                trainer.nnsam_options = nnsam_options(prof)
            out_base = Path(trainer.output_folder_base)
            trainer.progress_model_dir = model_dir
            trainer.compile_network = prof.compile_network
            trainer.num_epochs = prof.num_epochs
            trainer.num_iterations_per_epoch = prof.iterations_per_epoch
            trainer.num_val_iterations_per_epoch = prof.val_iterations_per_epoch
            trainer.initial_lr = prof.initial_lr
            trainer.oversample_foreground_percent = prof.oversample_foreground
            # no mid-run checkpoints: a partial run is discarded anyway (never published)
            trainer.save_every = max(prof.num_epochs + 1, 50)
            started_from = _load_warm_start(trainer, warm_start)  # last: it builds the optimiser's schedule
            log.info(
                "nnU-Net %s training: %d cases, %d x %d iterations, %s, patch %s, batch %d",
                prof.name, len(cases), trainer.num_epochs, prof.iterations_per_epoch, device,
                trainer.configuration_manager.patch_size, trainer.configuration_manager.batch_size,
            )  # fmt: skip
            t_train = time.perf_counter()
            with _quiet():
                trainer.run_training()
                if prof.final_validation:
                    trainer.perform_actual_validation(save_probabilities=False)
            train_seconds = time.perf_counter() - t_train
            lg = trainer.logger
            info_kwargs = dict(
                configuration=prof.configuration,
                fold=str(fold),
                trainer_name=cls.__name__,
                profile=prof.name,
                class_names=list(class_names),
                use_ignore=use_ignore,
                num_training_cases=len(cases),
                num_epochs=trainer.num_epochs,
                iterations_per_epoch=prof.iterations_per_epoch,
                seed=seed,
                device=str(device),
                patch_size=[int(i) for i in trainer.configuration_manager.patch_size],
                batch_size=int(trainer.configuration_manager.batch_size),
                spacing=[float(s) for s in trainer.configuration_manager.spacing],
                features_per_stage=[
                    int(f)
                    for f in trainer.configuration_manager.network_arch_init_kwargs["features_per_stage"]
                ],
                train_seconds=round(train_seconds, 3),
                seconds_per_iteration=round(trainer.train_seconds / max(trainer.train_iterations, 1), 4),
                epoch_seconds=[round(t, 3) for t in trainer.epoch_seconds],
                final_train_loss=_finite(lg.get_value("train_losses", step=-1)),
                final_val_loss=_finite(lg.get_value("val_losses", step=-1)),
                pseudo_dice=[float(x) for x in lg.get_value("dice_per_class_or_region", step=-1)],
                case_ids=dict(raw.case_ids),
                nnsam=trainer.nnsam_options.record(_unwrapped(trainer.network))
                if prof.trainer == "nnsam"
                else None,
                warm_started_from=started_from,
            )
        # stage next to model_dir (same filesystem) so the final rename is atomic
        model_dir.parent.mkdir(parents=True, exist_ok=True)
        staged = Path(tempfile.mkdtemp(prefix=f".tmp-{model_dir.name}-", dir=model_dir.parent))
        try:
            for name in ("plans.json", "dataset.json", "dataset_fingerprint.json"):
                if (out_base / name).exists():
                    shutil.copy2(out_base / name, staged / name)
            fold_src, fold_dst = out_base / f"fold_{fold}", staged / f"fold_{fold}"
            fold_dst.mkdir()
            for f in fold_src.iterdir():  # final checkpoint, logs, progress plot; not best/latest ckpts
                if f.is_file() and f.name not in ("checkpoint_best.pth", "checkpoint_latest.pth"):
                    shutil.copy2(f, fold_dst / f.name)
            info = ModelInfo(model_dir=model_dir, total_seconds=round(time.perf_counter() - t_start, 3),
                             **info_kwargs)  # fmt: skip
            (staged / MODEL_INFO_FILE).write_text(info.to_json())  # written last: marks a complete model
            _publish(staged, model_dir)
        except BaseException:
            shutil.rmtree(staged, ignore_errors=True)
            raise
    finally:
        torch.set_num_threads(old_threads)
    log.info(
        "nnU-Net trained in %.1f s (%.3f s/iteration), published %s", info.train_seconds,
        info.seconds_per_iteration, model_dir,
    )  # fmt: skip
    return info
