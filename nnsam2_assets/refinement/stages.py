"""The three pooled nnU-Net stages: each trains on its labels (``refinement.stage_labels``) into a versioned
model folder, then predicts every scan of the pool (``refinement.prediction``)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk

from nnsam2_assets.core import Log
from nnsam2_assets.core.cache import cache_key
from nnsam2_assets.core.imaging import read_image, same_grid
from nnsam2_assets.core.labels import class_names, ignore_label
from nnsam2_assets.core.layout import (
    DatasetLayout,
    model_pointer,
    model_version_dir,
    nnunet_work_root,
    staged_image,
    staged_label,
)
from nnsam2_assets.core.storage import atomic_write_image, atomic_write_json, sha256_file
from nnsam2_assets.refinement import nnunet
from nnsam2_assets.refinement.holdout import held_out_slab
from nnsam2_assets.refinement.models import (
    PREVIOUS,
    STAGE_IDS,
    RefinementError,
    current_model,
    recipe_key,
    trainer_record,
)
from nnsam2_assets.refinement.pool import Pool
from nnsam2_assets.refinement.prediction import input_key, predict_pool, scan_key, scan_roi
from nnsam2_assets.refinement.roi import Roi
from nnsam2_assets.refinement.rules import StageRule
from nnsam2_assets.refinement.stage_labels import exact_lineage, next_stage_labels, stage_labels
from nnsam2_assets.supervoxels.steps import SAMPLING_VERSION, sampling_points

# v3: the annotated slab is held out of training; v4: later stages learn finished predictions; v5: in
# those, a side's edge moves no further than the band from its own edge (``propagation.boundary``)
VERSION = "refinement-v5"


@dataclass
class StageResult:
    stage: str
    version: str
    model_dir: Path
    trained_now: bool
    selection: pd.DataFrame
    n_classes: int
    profile: str
    training_seconds: float
    seconds_per_iteration: float
    n_predicted: int
    relaxed_datasets: list[str] = field(default_factory=list)
    exact_label_slices: dict[str, list[int]] = field(default_factory=dict)  # "dataset/scan" -> slices
    # the model's trainer class and, for nnSAM, its record (level-set weight, SAM2 encoder or "none", level)
    trainer: dict = field(default_factory=dict)
    label_source: str = ""  # what the stage trained on (a later stage falls back to the pseudo-labels)

    @property
    def relaxed(self) -> bool:
        return bool(self.relaxed_datasets)


def _train_and_predict(
    stage: str,
    pool: Pool,
    root: Path,
    profile: nnunet.Profile,
    selection: pd.DataFrame,
    labels: dict,
    use_ignore: bool,
    log: Log,
    label_source: str,
) -> StageResult:
    if not labels:
        raise RefinementError(
            f"{stage}: no usable training case in {len(pool.layouts)} dataset(s) "
            f"({', '.join(pool.layouts) or 'none registered'}); every pseudo-label was dropped or missing"
        )
    recipe = recipe_key(profile)
    cases, sampling, inputs = _stage_training_cases(stage, pool, root, profile, labels)
    parts = [stage, VERSION, recipe, pool.classes, use_ignore, *inputs]
    warm_start, warm_version = _warm_start(stage, root, profile)
    if warm_start is not None:  # a fresh start's key stays as it was, so existing models stay current
        parts.append(warm_version)
    version = cache_key(*parts)[:16]
    model_dir = model_version_dir(root, stage, version)
    trained_now, t_train, per_iter = False, 0.0, float("nan")
    if not nnunet.is_complete_model(model_dir):  # one damaged on disk is trained again, not reused
        log(f"{stage}: training on {len(cases)} cases ({profile.name} profile) into {model_dir}")
        t0 = time.perf_counter()
        info = nnunet.train_model(
            cases=cases,
            class_names=list(class_names(pool.classes)),
            use_ignore=use_ignore,
            work_root=nnunet_work_root(root),
            model_dir=model_dir,
            profile=profile,
            dataset_id=STAGE_IDS[stage],
            sampling_points=sampling or None,
            seed=profile.seed,
            warm_start=warm_start,
        )
        t_train, trained_now = time.perf_counter() - t0, True
        per_iter = float(getattr(info, "seconds_per_iteration", float("nan")))
    else:
        log(f"{stage}: model {version} already trained on these inputs; reusing it")
    n_pred = predict_pool(model_dir, pool, profile.device, log, profile.roi_margin_mm)
    exact = exact_lineage(pool)
    atomic_write_json(
        {
            "version": version,
            "model_dir": str(model_dir),
            "n_classes": pool.classes,
            "stage": stage,
            "roi_margin_mm": profile.roi_margin_mm,
            "recipe": recipe,  # ``models_state`` compares it with the settings of a new run
            # the datasets with a case in this version's training set (``models_state`` reads it)
            "training_datasets": sorted({dataset for dataset, _ in labels}),
            "exact_label_slices": exact,
            # each dataset's slab no stage trained on: an annotation edit that moves it makes these models
            # stale for that dataset's held-out check (``holdout.slab_changed``)
            "held_out_slabs": {
                dataset: slab.record()
                for dataset, layout in pool.layouts.items()
                if (slab := held_out_slab(layout)) is not None
            },
            # per training case, the supervoxel patch centres it had (None: no supervoxels, nnU-Net's own draw)
            "supervoxel_points": {
                case: None if points is None else int(sum(len(p) for p in points.values()))
                for case, points in sampling.items()
            },
        },
        model_pointer(root, stage),
    )
    relaxed = sorted(selection.dataset[selection.relaxed].unique()) if "relaxed" in selection else []
    return StageResult(
        stage,
        version,
        model_dir,
        trained_now,
        selection,
        pool.classes,
        profile.name,
        t_train,
        per_iter,
        n_pred,
        relaxed,
        exact,
        trainer_record(model_dir),
        label_source,
    )


def _stage_training_cases(
    stage: str, pool: Pool, root: Path, profile: nnunet.Profile, labels: dict
) -> tuple[list[nnunet.TrainingCase], dict[str, dict[int, np.ndarray] | None], list]:
    """The stage's training cases written in its staging folder (image and label cropped to each scan's muscle
    box), their supervoxel patch centres (``foreground_sampling: supervoxels`` only) and what the model's
    version depends on: each case's scan content, box and label digest."""
    cases: list[nnunet.TrainingCase] = []
    parts: list = []
    sampling: dict[str, dict[int, np.ndarray] | None] = {}
    for (dataset, scan), arr in sorted(labels.items()):
        layout = pool.layouts[dataset]
        img = read_image(layout.scan_image(scan))
        label = sitk.GetImageFromArray(arr.astype(np.uint8))
        label.CopyInformation(img)
        image_path, label_path = layout.scan_image(scan), staged_label(root, stage, dataset, scan)
        roi = scan_roi(layout, scan, profile.roi_margin_mm)
        if roi is not None:
            image_path = staged_image(root, stage, dataset, scan)
            atomic_write_image(roi.crop(img), image_path)
            label = roi.crop(label)
        atomic_write_image(label, label_path)
        case_id = f"{dataset}__{scan}"  # unambiguous: a dataset name has no "__" (validate_dataset_key)
        cases.append(nnunet.TrainingCase(case_id, image_path, label_path))
        parts += [dataset, scan, input_key(scan_key(layout, scan), roi), sha256_file(label_path)[:16]]
        if profile.foreground_sampling == "supervoxels":
            points, digest = supervoxel_points(
                layout, scan, img, roi, sitk.GetArrayFromImage(label), ignore_label(pool.classes)
            )
            sampling[case_id] = points
            parts.append(digest)
    return cases, sampling, parts


def _warm_start(stage: str, root: Path, profile: nnunet.Profile) -> tuple[nnunet.WarmStart | None, str]:
    """Where a later stage starts from when the profile warm-starts (the previous stage's current model), and
    that model's version for the new one's key."""
    if stage not in PREVIOUS or not profile.warm_start_epochs:
        return None, ""
    pointer = current_model(root, PREVIOUS[stage][0])
    checkpoint = nnunet.ModelInfo.from_dir(Path(pointer["model_dir"])).checkpoint
    return nnunet.WarmStart(checkpoint, profile.warm_start_epochs), pointer["version"]


def supervoxel_points(
    layout: DatasetLayout,
    scan: str,
    image: sitk.Image,
    roi: Roi | None,
    labels: np.ndarray,
    ignore_label: int,
) -> tuple[dict[int, np.ndarray] | None, str]:
    """The scan's supervoxel patch centres on its training crop, and what they were made from. A scan without
    supervoxels (the asset not materialized, or the scan added since) keeps nnU-Net's own draw: None.
    ``image`` is the scan's canonical crop, which the supervoxels must lie on."""
    path = layout.supervoxels(scan)
    if not path.exists():
        return None, "no-supervoxels"
    supervoxels = read_image(path)
    if not same_grid(supervoxels, image):
        # made of an earlier crop (a new region, a re-exported scan) and not materialized since: the supervoxels
        # asset is not upstream of the stages, so its files may lag; their points would land elsewhere
        return None, "stale-supervoxels"
    on_crop = sitk.GetArrayFromImage(roi.crop(supervoxels) if roi is not None else supervoxels)
    return sampling_points(on_crop, labels, ignore_label), f"{SAMPLING_VERSION}:{sha256_file(path)[:16]}"


def run_stage1(pool: Pool, root: Path, profile: nnunet.Profile, log: Log = print) -> StageResult:
    selection, labels = stage_labels("stage1", pool, root, None)
    return _train_and_predict(
        "stage1", pool, root, profile, selection, labels, True, log, "the propagated pseudo-labels"
    )


def run_next_stage(
    stage: str, pool: Pool, root: Path, profile: nnunet.Profile, rule: StageRule, log: Log = print
) -> StageResult:
    selection, labels, source = next_stage_labels(stage, pool, root, rule, log)
    return _train_and_predict(stage, pool, root, profile, selection, labels, True, log, source)
