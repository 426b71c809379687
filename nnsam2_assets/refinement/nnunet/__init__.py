"""Dagster-free wrapper over the nnU-Net v2 (2.8.1) Python API: raw dataset writer, plan/preprocess,
training into an atomically published model folder, and a load-once predictor.

Why the Python API and not the CLI: the CLI finds trainers by name, which in the CPU venv (no torchvision)
only works for ``nnUNetTrainer`` itself, and it cannot set the iteration budget. Here we instantiate our own
trainer subclass directly and set epochs/iterations as attributes.

No mirroring anywhere: labels are side-specific (right/left), so a left-right flip in augmentation or
test-time augmentation would swap class meanings. The trainer from ``trainer_class()`` disables mirror augmentation and
stores ``inference_allowed_mirroring_axes=None`` in the checkpoint; ``Predictor`` additionally builds its
nnU-Net predictor with ``use_mirroring=False``. The checkpoint's ``trainer_name`` is
``nnUNetTrainerNoMirroring`` (the name of nnU-Net's own equivalent variant, identical network), so the
stock CLI can also predict from our model folders on machines where trainer lookup works; our ``Predictor``
never looks the trainer up by name (it builds the network with ``nnUNetTrainer.build_network_architecture``).

Process-wide settings: ``nnUNet_def_n_proc=1`` and ``nnUNet_n_proc_DA=0`` are set (setdefault) when this
module is imported, because nnU-Net reads them at ITS import time; nnunetv2 itself is imported lazily.
``nnUNet_raw/_preprocessed/_results`` are set only for the duration of each call (``nnunet_env``).
Fingerprinting and preprocessing run in-process (nnU-Net's spawn pool is swapped for a 1-thread pool while
our call runs) so no interpreter is spawned: faster on 2 cores and safe without ``__main__`` guards. The
fingerprint samples 10,000 foreground intensities per case instead of nnU-Net's 10^8 per dataset
(``planning.fingerprint_extractor_class``): the statistics feed only CT normalisation, which is never used.

Quick profile (CPU), as shipped: 2d, in-plane resampled to >= 2 mm, patch <= 96x96, batch <= 4, 8 epochs x 75
iterations (600), 1 torch thread, foreground oversampling 0.9 (pseudo-labels are sparse: most slices are
"ignore"), in-plane rotation capped at +-15 degrees (see ``trainers.MAX_ROTATION_DEG``: larger rotations swap
sides), and training/prediction cropped to the muscles' in-plane box plus 20 mm (``roi_margin_mm``, applied by
refinement/stages.py and refinement/prediction.py with refinement/roi.py): a 96-pixel patch of a full slice cannot see both sides of the spine and
swapped right and left on the TUM pair. Measured on this 2-core machine: 0.25-0.28 s per iteration on the
cropped TUM pair (patch 56x96, batch 3), so one stage (plan, preprocess, train, predict) takes ~2.5-3 minutes.
With 240 iterations the multifidus classes were never predicted on TUM (4-class Dice 0.41); with 600 they are
(0.71-0.76). 2 torch threads on 2 shared cores were 3-6x slower per iteration than 1.

``Profile.trainer = "nnsam"`` trains nnSAM instead (``nnsam.py``: a frozen SAM2 image encoder beside nnU-Net's,
and a level-set shape head); its trainer subclasses the no-mirroring one and its model record says what ran.
"""

from __future__ import annotations

from typing import Any

from . import _common, predict  # _common first: it sets nnUNet_def_n_proc / nnUNet_n_proc_DA
from ._common import (
    CHANNEL_NAME,
    MODEL_INFO_FILE,
    PROFILES,
    TRAINER_NAME,
    Profile,
    get_profile,
    nnunet_env,
    resolve_device,
)
from .planning import plan_and_preprocess
from .predict import Predictor
from .raw import RawDataset, TrainingCase, _unique_ids, dataset_name, sanitize_case_id, write_raw_dataset
from .train import ModelInfo, WarmStart, is_complete_model, train_model
from .trainers import (
    TrainingProgress,
    nnsam_trainer_class,
    trainer_class,
    trainer_identity,
    training_progress,
)

__all__ = [
    "CHANNEL_NAME",
    "MODEL_INFO_FILE",
    "PREDICTOR_LOADS",
    "PROFILES",
    "TRAINER_NAME",
    "ModelInfo",
    "Predictor",
    "Profile",
    "RawDataset",
    "TrainingCase",
    "TrainingProgress",
    "WarmStart",
    "dataset_name",
    "get_profile",
    "nnunet_env",
    "plan_and_preprocess",
    "resolve_device",
    "sanitize_case_id",
    "train_model",
    "nnsam_trainer_class",
    "trainer_class",
    "trainer_identity",
    "training_progress",
    "write_raw_dataset",
    "is_complete_model",
]
_ = (_common, _unique_ids)


def __getattr__(name: str) -> Any:
    # PREDICTOR_LOADS lives in .predict and changes; forward reads so nnunet.PREDICTOR_LOADS stays live
    if name == "PREDICTOR_LOADS":
        return predict.PREDICTOR_LOADS
    raise AttributeError(name)
