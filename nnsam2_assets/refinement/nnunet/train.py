"""``train_model``: write the raw dataset, plan, preprocess and train one nnU-Net, optionally from another model's
weights, and publish it atomically with its record (``ModelInfo``)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from nnsam2_assets.core.storage import fsync_tree

from ._common import (
    MODEL_INFO_FILE,
    PLANS_NAME,
    Profile,
    _env_override,
    _quiet,
    get_profile,
    log,
    nnunet_env,
    resolve_device,
)
from .planning import centre_foreground_on, plan_and_preprocess
from .raw import TrainingCase, write_raw_dataset
from .trainers import _unwrapped, nnsam_options, nnsam_trainer_class, trainer_class

if TYPE_CHECKING:  # torch and nnU-Net load only when a model trains
    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


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

    @property
    def checkpoint(self) -> Path:
        """The published weights: nnU-Net's final checkpoint of the model's fold."""
        return self.model_dir / f"fold_{self.fold}" / "checkpoint_final.pth"

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        d["model_dir"] = str(self.model_dir)
        return json.dumps(d, indent=2)

    @classmethod
    def from_dir(cls, model_dir: Path) -> ModelInfo:
        d = json.loads((Path(model_dir) / MODEL_INFO_FILE).read_text())
        d["model_dir"] = Path(model_dir)
        return cls(**d)


def is_complete_model(model_dir: Path) -> bool:
    """Whether ``model_dir`` holds a published model that can be loaded: its record reads and its checkpoint
    has content. A model is reused by its name (a hash of its inputs), so one damaged on disk would otherwise
    fail every later run instead of being trained again."""
    try:
        checkpoint = ModelInfo.from_dir(model_dir).checkpoint
        return checkpoint.is_file() and checkpoint.stat().st_size > 0
    except (OSError, ValueError, TypeError):  # missing or unreadable record, or one of another shape
        return False


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
        with _quiet(), loadable_here(Path(warm_start.checkpoint)) as checkpoint:
            load_pretrained_weights(trainer.network, str(checkpoint))
    except AssertionError as exc:  # nnU-Net checks every layer before it copies any
        log.warning("warm start from %s skipped, training fresh: %s", warm_start.checkpoint, exc)
        trainer.num_epochs = fresh_epochs
        trainer.optimizer, trainer.lr_scheduler = trainer.configure_optimizers()
        return None
    return str(warm_start.checkpoint)


@contextlib.contextmanager
def loadable_here(checkpoint: Path) -> Iterator[Path]:
    """``checkpoint``, or a copy of it with its tensors on the CPU where this machine has no GPU: nnU-Net saves a
    model's weights on the device they trained on, and its ``load_pretrained_weights`` gives ``torch.load`` no
    ``map_location``, so a stage 1 trained on a GPU failed the next stage's warm start on a CPU machine."""
    import torch

    if torch.cuda.is_available():
        yield checkpoint
        return
    with tempfile.TemporaryDirectory(prefix="nnsam2-warm-start-") as folder:
        copy = Path(folder) / checkpoint.name
        # our own published model, so a full unpickle (nnU-Net's checkpoints hold more than tensors)
        torch.save(torch.load(checkpoint, map_location="cpu", weights_only=False), copy)
        yield copy


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
            trainer.data_seed = seed
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
            record = _training_record(
                trainer, prof, cls.__name__, fold, class_names, use_ignore, len(cases), seed, device,
                train_seconds, dict(raw.case_ids), started_from,
            )  # fmt: skip
        info = _publish_model(out_base, fold, model_dir, record, t_start)
    finally:
        torch.set_num_threads(old_threads)
    log.info(
        "nnU-Net trained in %.1f s (%.3f s/iteration), published %s", info.train_seconds,
        info.seconds_per_iteration, model_dir,
    )  # fmt: skip
    return info


def _training_record(
    trainer: nnUNetTrainer,
    prof: Profile,
    trainer_name: str,
    fold: int | str,
    class_names: Sequence[str],
    use_ignore: bool,
    n_cases: int,
    seed: int,
    device: torch.device,
    train_seconds: float,
    case_ids: dict,
    started_from: str | None,
) -> dict:
    """What a trained model records (``ModelInfo``'s fields but its folder and total time)."""
    lg = trainer.logger
    return dict(
        configuration=prof.configuration,
        fold=str(fold),
        trainer_name=trainer_name,
        profile=prof.name,
        class_names=list(class_names),
        use_ignore=use_ignore,
        num_training_cases=n_cases,
        num_epochs=trainer.num_epochs,
        iterations_per_epoch=prof.iterations_per_epoch,
        seed=seed,
        device=str(device),
        patch_size=[int(i) for i in trainer.configuration_manager.patch_size],
        batch_size=int(trainer.configuration_manager.batch_size),
        spacing=[float(s) for s in trainer.configuration_manager.spacing],
        features_per_stage=[
            int(f) for f in trainer.configuration_manager.network_arch_init_kwargs["features_per_stage"]
        ],
        train_seconds=round(train_seconds, 3),
        seconds_per_iteration=round(trainer.train_seconds / max(trainer.train_iterations, 1), 4),
        epoch_seconds=[round(t, 3) for t in trainer.epoch_seconds],
        final_train_loss=_finite(lg.get_value("train_losses", step=-1)),
        final_val_loss=_finite(lg.get_value("val_losses", step=-1)),
        pseudo_dice=[float(x) for x in lg.get_value("dice_per_class_or_region", step=-1)],
        case_ids=case_ids,
        nnsam=trainer.nnsam_options.record(_unwrapped(trainer.network)) if prof.trainer == "nnsam" else None,
        warm_started_from=started_from,
    )


def _publish_model(
    out_base: Path, fold: int | str, model_dir: Path, record: dict, t_start: float
) -> ModelInfo:
    """Copy the trained fold (final checkpoint, logs, progress plot) beside ``model_dir`` and rename it into
    place, so the model only ever appears complete."""
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
                         **record)  # fmt: skip
        (staged / MODEL_INFO_FILE).write_text(info.to_json())  # written last: marks a complete model
        fsync_tree(staged)  # a reused model is never read back to check it: it must be whole on disk
        _publish(staged, model_dir)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    return info
