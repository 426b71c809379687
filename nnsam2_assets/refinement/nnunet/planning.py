"""nnU-Net's plan and preprocessing for our cases, in-process: the quick profile's 2d re-plan, a sampled
fingerprint, and the foreground locations that oversampled patches are centred on."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ._common import (
    PLANS_NAME,
    Profile,
    _env_override,
    _in_process_pools,
    _quiet,
)
from .raw import RawDataset


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


def axial_planner_class() -> type:
    """nnU-Net's planner with its axes kept as stored (z, y, x): a 2d network then learns axial slices, where
    the muscle box holds both sides. nnU-Net puts the axis of coarsest spacing first, so a thin-slice scan
    (z 0.6 mm, in-plane 0.8 mm) was cut into coronal slices, with z resampled to the quick profile's 2 mm."""
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import (
        ExperimentPlanner,
    )

    class AxialExperimentPlanner(ExperimentPlanner):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **{**kwargs, "suppress_transpose": True})

    return AxialExperimentPlanner


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
        planner_class = axial_planner_class()
        plans, _ = plan_experiment_dataset(raw.dataset_id, planner_class)
        if profile.rewrites_plan:  # a 2d profile: ``Profile`` refuses the others
            planner = planner_class(raw.dataset_id)
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
