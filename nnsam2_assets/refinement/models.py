"""The three stages and their published models: the stage order, each stage's current model, whether the
models are current for a set of datasets and a training recipe, and what trained a model."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from nnsam2_assets.core.cache import cache_key
from nnsam2_assets.core.layout import DatasetLayout, model_pointer
from nnsam2_assets.refinement import nnunet
from nnsam2_assets.refinement.holdout import held_out_slab, slab_changed

STAGES = ("stage1", "stage2", "stage3")
STAGE_IDS = {"stage1": 901, "stage2": 902, "stage3": 903}
# a later stage learns the first stage's predictions where they agree with the second's (stage 2: with the
# propagated masks)
PREVIOUS = {"stage2": ("stage1", None), "stage3": ("stage2", "stage1")}


class RefinementError(RuntimeError):
    """A stage cannot run: a previous stage's model or every training label is missing."""


def current_model(root: Path, stage: str) -> dict:
    pointer = model_pointer(root, stage)
    if not pointer.exists():
        raise RefinementError(f"{pointer}: no {stage} model yet; materialize nnunet_{stage} first")
    return json.loads(pointer.read_text())


@dataclass(frozen=True)
class ModelsState:
    """Whether the current models of every stage exist and were trained with a case of each dataset."""

    current: bool
    reason: str  # why they are not current ("" when they are)
    versions: dict[str, str]  # stage -> current version, for the stages checked so far


def trained_on(pointer: dict, datasets: list[str]) -> set[str]:
    """Which of ``datasets`` have a case in the training set of the model a ``current.json`` points at."""
    if "training_datasets" in pointer:
        return set(datasets) & set(pointer["training_datasets"])
    # a pointer written before the field existed: the model's case ids are "<dataset>__<scan>"
    info = json.loads((Path(pointer["model_dir"]) / nnunet.MODEL_INFO_FILE).read_text())
    keys = list(info.get("case_ids", {}))
    return {d for d in datasets if any(key.startswith(f"{d}__") for key in keys)}


# where and how the network runs, not what it learns: a model trained on the GPU serves a CPU run, and the
# other way round (a device change had retrained all three stages and rewritten every final mask)
EXECUTION_FIELDS = ("device", "num_threads", "data_workers")


def recipe_key(profile: nnunet.Profile) -> str:
    """What a model's training recipe is, beyond its data: the profile (trainer, sampling, budget) and the
    trainer's weights. The execution fields count as the named profile's own, so its key stays as it was."""
    base = nnunet.PROFILES.get(profile.name)
    if base is not None:
        profile = profile.replace(**{name: getattr(base, name) for name in EXECUTION_FIELDS})
    trainer = nnunet.trainer_identity(profile)  # the SAM2 weights by content
    if profile.sam2_checkpoint:  # so not by path: the same weights moved or copied are the same recipe
        profile = profile.replace(sam2_checkpoint="(by content)")
    extra = (f"seed {profile.seed}",) if profile.seed else ()
    if profile.warm_start_epochs:
        extra += (f"warm start {profile.warm_start_epochs}",)
    return cache_key(repr(profile), trainer, *extra)[:16]


def models_state(root: Path, datasets: list[str], recipe: str | None = None) -> ModelsState:
    """Are the pooled models current for ``datasets``: each stage has a complete current model whose training
    set holds a case of every one of them, trained with ``recipe`` (``recipe_key``) when given? (Scans added
    to a dataset since do not make a model stale: they get predictions from it.) Dagster-free: reads the
    stages' ``current.json`` and model folders."""
    versions: dict[str, str] = {}
    slabs = {d: held_out_slab(DatasetLayout(root, d)) for d in datasets}  # read once, compared per stage
    for stage in STAGES:
        pointer_path = model_pointer(root, stage)
        if not pointer_path.exists():
            return ModelsState(False, f"no {stage} model yet", versions)
        pointer = json.loads(pointer_path.read_text())
        if not nnunet.is_complete_model(Path(pointer["model_dir"])):
            return ModelsState(
                False, f"the current {stage} model {pointer['version']} is missing or damaged", versions
            )
        if recipe is not None and pointer.get("recipe", recipe) != recipe:
            return ModelsState(
                False,
                f"the {stage} model was trained with another recipe (trainer, sampling or profile)",
                versions,
            )
        missing = sorted(set(datasets) - trained_on(pointer, datasets))
        if missing:
            return ModelsState(
                False, f"{', '.join(missing)} had no case in the {stage} training set", versions
            )
        moved = sorted(d for d in datasets if slab_changed(pointer, d, slabs[d]))
        if moved:
            return ModelsState(
                False,
                f"the annotated slice held out in {', '.join(moved)} changed since the {stage} model trained "
                "(it trained on the new one)",
                versions,
            )
        unsampled = _sampled_without_supervoxels(root, pointer, datasets)
        if unsampled:
            return ModelsState(
                False,
                f"the {stage} model drew its patches without supervoxels in {', '.join(unsampled)}, which has "
                "them now",
                versions,
            )
        versions[stage] = pointer["version"]
    return ModelsState(True, "", versions)


def _sampled_without_supervoxels(root: Path, pointer: dict, datasets: list[str]) -> list[str]:
    """The datasets with a training case that a supervoxel-sampled model trained on with nnU-Net's own draw
    (no supervoxels then) and whose supervoxels exist now: a stage trained on them would learn otherwise."""
    stale: set[str] = set()
    for case, points in pointer.get("supervoxel_points", {}).items():  # empty unless the recipe samples so
        dataset, _, scan = case.partition("__")  # case ids are "<dataset>__<scan>"
        if points is None and dataset in datasets and DatasetLayout(root, dataset).supervoxels(scan).exists():
            stale.add(dataset)
    return sorted(stale)


def trainer_record(model_dir: Path) -> dict:
    """What trained a published model: its trainer class, its network's width per stage, its training seed,
    the checkpoint it started from (a warm start only) and, for nnSAM, what the encoder and head were."""
    info = nnunet.ModelInfo.from_dir(model_dir)
    warm = {"warm_started_from": info.warm_started_from} if info.warm_started_from else {}
    return {
        "trainer": info.trainer_name,
        "features_per_stage": info.features_per_stage,
        "training_seed": info.seed,
        **warm,
        **(info.nnsam or {}),
    }
