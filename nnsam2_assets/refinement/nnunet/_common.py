"""Shared nnU-Net wrapper pieces: process settings, profiles, env scoping, console quieting."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from multiprocessing.pool import ThreadPool
from pathlib import Path
from types import SimpleNamespace
from typing import Any

# nnU-Net reads these at import of nnunetv2.configuration; 8 spawned workers on 2 cores made final
# validation ~8x slower (docs/install.md, "nnU-Net on CPU"). setdefault keeps an explicit user choice.
os.environ.setdefault("nnUNet_def_n_proc", "1")
os.environ.setdefault("nnUNet_n_proc_DA", "0")

log = logging.getLogger("nnsam2_assets.refinement.nnunet")

# The nnunetv2 modules this wrapper imports lazily; the trainer alone takes ~10 s to import on a 2-core
# machine, so a process that forks steps (the code location's forkserver executor) preloads them once.
HEAVY_MODULES = (
    "nnunetv2.training.nnUNetTrainer.nnUNetTrainer",
    "nnunetv2.inference.predict_from_raw_data",
    "nnunetv2.experiment_planning.plan_and_preprocess_api",
)

TRAINER_NAME = "nnUNetTrainerNoMirroring"
TRAINERS = ("plain", "nnsam")
FOREGROUND_SAMPLING = ("pseudo_labels", "supervoxels")
MODEL_INFO_FILE = "nnsam2_model.json"
CHANNEL_NAME = "zscore_mixed"  # anything but "CT": per-case z-score, because MRI and CT are pooled
PLANS_NAME = "nnUNetPlans"
_ENV_KEYS = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")


# --------------------------------------------------------------------------------------------- profiles
@dataclass(frozen=True)
class Profile:
    """Training recipe. ``quick`` is CPU-sized; ``paper`` is the published recipe (GPU expected)."""

    name: str
    configuration: str  # "2d" | "3d_fullres"
    num_epochs: int
    iterations_per_epoch: int
    val_iterations_per_epoch: int
    # quick-plan rewrite (2d only): in-plane spacing target (never finer than the data), caps
    target_inplane_spacing_mm: float | None = None
    max_patch: int | None = None
    max_batch: int | None = None
    # the 2d network's first-stage width (nnU-Net doubles it per stage up to its cap); None keeps nnU-Net's 32
    base_features: int | None = None
    device: str = "auto"  # "auto" -> cuda if available else cpu
    num_threads: int | None = None  # torch intra-op threads; None keeps torch's default
    # augmentation worker processes: None -> 0 (in-process) on CPU, up to 8 on CUDA so the GPU is fed
    data_workers: int | None = None
    initial_lr: float = 1e-2
    # share of training samples forced to contain foreground. Pseudo-labels keep only confident slices (the rest
    # is "ignore"), so a 2d loader drawing slices uniformly mostly sees all-ignore slices with zero loss
    oversample_foreground: float = 0.33
    final_validation: bool = False  # nnU-Net's full-volume validation (meaningless with fold "all")
    # torch.compile of the network and loss on CUDA: None keeps nnU-Net's rule (on for CUDA unless the
    # nnUNet_compile env var says otherwise; never on CPU); True/False override that env var. Left out of the
    # repr, so of the recipe key: how the same network is executed must not retrain existing models
    compile_network: bool | None = field(default=None, repr=False)
    # train and predict on the in-plane box of the propagated mask plus this margin (refinement/roi.py); None = whole
    # slice. The quick profile's small patches cannot see both sides of a full slice, which swaps sides
    roi_margin_mm: float | None = None
    # "plain": nnU-Net's network; "nnsam": a frozen SAM2 encoder beside it and a level-set head (nnunet/nnsam.py)
    trainer: str = "plain"
    level_set_weight: float = 0.1  # nnsam: the shape head's share of the loss
    sam2_config: str = ""  # nnsam: "" is SAM2's default config; the checkpoint is the propagation resource's
    sam2_checkpoint: str = ""  # nnsam: "" runs the shape head alone
    sam2_image_size: int = 256  # nnsam: the encoder's input size (the paper's 1024 is for a GPU)
    # nnsam without a checkpoint in tests and benchmarks: a random encoder, plumbing and not accuracy
    sam2_random_weights: bool = False
    # where foreground patches are centred: "pseudo_labels" (nnU-Net's uniform draw inside the labels) or
    # "supervoxels" (on one supervoxel at a time; refinement/stages.py hands the maps to train_model)
    foreground_sampling: str = "pseudo_labels"
    # the training RNGs' seed (torch, numpy, random). Out of the repr: ``refinement.models.recipe_key`` adds
    # it only when it is not 0, so the default recipe's models keep their versions
    seed: int = field(default=0, repr=False)
    # stages after the first start from the previous stage's weights and train this many epochs (nnU-Net's
    # ``load_pretrained_weights``): a later stage learns labels close to what the previous model predicts, so
    # it needs less than a fresh start. 0 trains every stage from scratch for ``num_epochs``. Out of the repr
    # for the seed's reason: ``recipe_key`` adds it when it is set
    warm_start_epochs: int = field(default=0, repr=False)

    def __post_init__(self) -> None:
        if self.trainer not in TRAINERS:
            raise ValueError(f"unknown trainer {self.trainer!r}; choose from {sorted(TRAINERS)}")
        if self.foreground_sampling not in FOREGROUND_SAMPLING:
            raise ValueError(
                f"unknown foreground sampling {self.foreground_sampling!r}; "
                f"choose from {sorted(FOREGROUND_SAMPLING)}"
            )
        if self.rewrites_plan and self.configuration != "2d":
            raise ValueError(
                f"the {self.configuration} configuration with a rewritten plan: in-plane spacing, patch and "
                "batch caps and the network width are implemented for 2d only"
            )
        if self.trainer == "nnsam" and self.uses_sam_encoder and self.configuration != "2d":
            # the encoder embeds 2-D images (nnSAM's own design): a 3-D patch failed on the first training step,
            # after the whole chain had run
            raise ValueError(
                f"nnsam with a SAM2 encoder needs a 2d configuration, not {self.configuration} (profile "
                f"{self.name!r}): use the quick profile, or no checkpoint for the shape head alone"
            )
        if self.warm_start_epochs < 0:
            raise ValueError(f"warm_start_epochs {self.warm_start_epochs}: 0 (off) or more")
        if self.base_features is not None and self.base_features < 4:
            raise ValueError(f"network width {self.base_features}: at least 4 features")

    def replace(self, **changes: Any) -> Profile:
        return dataclasses.replace(self, **changes)

    @property
    def uses_sam_encoder(self) -> bool:
        return bool(self.sam2_checkpoint or self.sam2_random_weights)

    @property
    def rewrites_plan(self) -> bool:
        """Does the profile change nnU-Net's own plan (the quick 2d re-plan)?"""
        return bool(self.target_inplane_spacing_mm or self.max_patch or self.max_batch or self.base_features)

    @property
    def total_iterations(self) -> int:
        return self.num_epochs * self.iterations_per_epoch


PROFILES: dict[str, Profile] = {
    "paper": Profile(
        "paper", "3d_fullres", num_epochs=1000, iterations_per_epoch=250, val_iterations_per_epoch=50
    ),
    "quick": Profile(
        "quick",
        "2d",
        num_epochs=8,
        iterations_per_epoch=75,
        val_iterations_per_epoch=3,
        oversample_foreground=0.9,
        target_inplane_spacing_mm=2.0,
        max_patch=96,
        max_batch=4,
        roi_margin_mm=20.0,
        # on an H200 compiling took a 600-iteration stage's first epoch from 4.9 to 8.6 s with a warm
        # compile cache (minutes cold) to save 6 % of 0.025 s per iteration: about one second per stage
        compile_network=False,
        # 2 intra-op threads on 2 shared cores ran 6x slower (4.0 vs 0.63 s/iteration) when anything else ran
        num_threads=1,
    ),
}


def get_profile(name: str, **overrides: Any) -> Profile:
    """Named profile with optional field overrides (e.g. ``num_epochs=2``)."""
    if name not in PROFILES:
        raise KeyError(f"unknown nnU-Net profile {name!r}; choose from {sorted(PROFILES)}")
    return PROFILES[name].replace(**overrides) if overrides else PROFILES[name]


def resolve_device(device: str = "auto") -> Any:
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


# ------------------------------------------------------------------------------------------ environment
@contextlib.contextmanager
def _env_override(values: dict[str, str | None]) -> Iterator[None]:
    """Set (or unset, for None) env vars for the duration of the block, then restore them."""
    old = {k: os.environ.get(k) for k in values}
    try:
        for key, value in values.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        yield
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def nnunet_env(
    raw: Path | None = None, preprocessed: Path | None = None, results: Path | None = None
) -> contextlib.AbstractContextManager[None]:
    """Set nnU-Net's folder env vars for one call and restore the previous values afterwards.

    nnunetv2 2.8 reads them lazily (``_EnvPath``), so scoping them per call works.
    """
    vals = (raw, preprocessed, results)
    return _env_override({k: None if v is None else str(v) for k, v in zip(_ENV_KEYS, vals, strict=True)})


class _LogStream(io.TextIOBase):
    """stdout replacement that forwards nnU-Net's print() noise to our logger at DEBUG."""

    def write(self, s: str) -> int:
        if s.strip():
            log.debug("nnunet: %s", s.rstrip())
        return len(s)


def _drop_distutils(record: logging.LogRecord) -> bool:
    # nnU-Net's preprocess copies labels with distutils' copy_file, which logs "copying ..." at INFO on the
    # ROOT logger once per case
    return "_distutils" not in record.pathname


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Send nnU-Net's print() output to our DEBUG log and drop distutils' per-file INFO lines."""
    root = logging.getLogger()
    root.addFilter(_drop_distutils)
    try:
        with contextlib.redirect_stdout(_LogStream()):
            yield
    finally:
        root.removeFilter(_drop_distutils)


@contextlib.contextmanager
def _in_process_pools() -> Iterator[None]:
    """Run nnU-Net's fingerprint/preprocess 'spawn' pools as a 1-thread pool in this process.

    Spawning costs seconds per interpreter on 2 cores and needs __main__ guards; the pool API these modules
    use (starmap_async, ``_pool[i].is_alive()``) is the same on ThreadPool.
    """
    import multiprocessing

    from nnunetv2.experiment_planning.dataset_fingerprint import fingerprint_extractor
    from nnunetv2.preprocessing.preprocessors import default_preprocessor
    from nnunetv2.utilities import utils as nnunet_utils

    ctx = SimpleNamespace(Pool=lambda n=1, *a, **k: ThreadPool(1))
    shim = SimpleNamespace(get_context=lambda method=None: ctx)
    modules = (fingerprint_extractor, default_preprocessor)
    # utils lists the raw dataset with a *fork* Pool; its workers die by SIGTERM at pool exit, which inside a
    # Dagster step prints a DagsterExecutionInterruptedError traceback per worker
    fork_pool = nnunet_utils.Pool
    try:
        for mod in modules:
            mod.multiprocessing = shim
        nnunet_utils.Pool = lambda processes=1, *a, **k: ThreadPool(1)
        yield
    finally:
        for mod in modules:
            mod.multiprocessing = multiprocessing
        nnunet_utils.Pool = fork_pool
