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
our call runs) so no interpreter is spawned: faster on 2 cores and safe without ``__main__`` guards.

Quick profile, measured on this 2-core CPU machine (torch 2.13 CPU) with 8 synthetic 16x128x128 volumes at
1 x 1 x 3 mm, WHILE OTHER JOBS LOADED THE MACHINE (load average 4-8), so treat these as upper-end numbers:
resampled to 2 mm in-plane, the 2d plan is patch 64x64, batch 4 (5-stage U-Net). One training iteration
(loading + augmentation + forward/backward) took 0.27 s (lighter load) to 0.63 s with 1 torch thread; with 2 threads it took
1.6-4.0 s (oversubscribed cores), hence ``num_threads=1`` in the quick profile. The quick budget is
6 epochs x 25 iterations (150 iterations) plus 3 validation iterations per epoch: measured 43 s of training
and 59 s for the whole ``train_model`` (writing + fingerprint/plan/preprocess ~15 s), pseudo Dice 0.99; under
heavy load expect up to ~2x. On the demo data the pseudo Dice was 0.6-0.7
after 50 iterations and 0.99 after 240. A 128x128 patch (in-plane FOV >= 256 mm) has 4x the pixels, so
expect roughly 4x per iteration (not measured); lower the budget there. ``Predictor`` (1 thread) predicted 8
such volumes in 3.7 s (0.46 s each); the first load took 3.7 s including the torch/nnunetv2 imports.
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
from .predict import Predictor
from .raw import RawDataset, TrainingCase, _unique_ids, dataset_name, sanitize_case_id, write_raw_dataset
from .train import ModelInfo, plan_and_preprocess, train_model, trainer_class

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
    "dataset_name",
    "get_profile",
    "nnunet_env",
    "plan_and_preprocess",
    "resolve_device",
    "sanitize_case_id",
    "train_model",
    "trainer_class",
    "write_raw_dataset",
]
_ = (_common, _unique_ids)


def __getattr__(name: str) -> Any:
    # PREDICTOR_LOADS lives in .predict and changes; forward reads so nnunet.PREDICTOR_LOADS stays live
    if name == "PREDICTOR_LOADS":
        return predict.PREDICTOR_LOADS
    raise AttributeError(name)
