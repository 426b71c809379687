"""The three pooled nnU-Net stages: what each trains on, training into a versioned model folder, and
prediction of every scan of the pool with one predictor load.

Pooling: datasets may differ in modality and class count, so the pool trains on the classes every dataset
has: 4-class only when every dataset is 4-class, otherwise the 2-class side merge. MRI and CT share one
input channel normalised per case (the wrapper's channel name is not "CT").
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk

from nnsam2_assets.core import Log
from nnsam2_assets.core.cache import ScanCache, cache_key
from nnsam2_assets.core.imaging import read_array, read_image
from nnsam2_assets.core.labels import class_names, ignore_label, mean_dice, to_class_space
from nnsam2_assets.core.layout import (
    DatasetLayout,
    model_pointer,
    model_version_dir,
    nnunet_work_root,
    stage_prediction,
    staged_image,
    staged_label,
)
from nnsam2_assets.core.storage import atomic_write_image, atomic_write_json, sha256_file
from nnsam2_assets.ingest.convention import DatasetSpec
from nnsam2_assets.ingest.scans import ok_scans
from nnsam2_assets.refinement import nnunet
from nnsam2_assets.refinement.corrections import corrected_exact_labels
from nnsam2_assets.refinement.finishing import finish_refined
from nnsam2_assets.refinement.holdout import exact_label_slices, held_out_slab
from nnsam2_assets.refinement.roi import Roi, roi_from_mask
from nnsam2_assets.refinement.rules import StageRule, select_stage_cases, slice_agreement, volume_smooth
from nnsam2_assets.supervoxels.steps import sampling_points

# v3: the annotated slab is held out of training; v4: later stages learn finished predictions; v5: in
# those, a side's edge moves no further than the band from its own edge (``propagation.boundary``)
VERSION = "refinement-v5"
STAGES = ("stage1", "stage2", "stage3")
STAGE_IDS = {"stage1": 901, "stage2": 902, "stage3": 903}
PREVIOUS = {"stage2": ("stage1", None), "stage3": ("stage2", "stage1")}


class RefinementError(RuntimeError):
    pass


@dataclass
class Pool:
    layouts: dict[str, DatasetLayout]
    n_classes: dict[str, int]
    scans: dict[str, list[str]]
    modality: dict[str, str] = field(default_factory=dict)  # how a later stage finishes its labels

    @property
    def classes(self) -> int:
        return 4 if self.n_classes and all(k == 4 for k in self.n_classes.values()) else 2

    def items(self) -> Iterator[tuple[str, str, DatasetLayout]]:
        for dataset, scans in self.scans.items():
            for scan in scans:
                yield dataset, scan, self.layouts[dataset]

    def to_pool(self, dataset: str, labels: np.ndarray, ignore: bool = False) -> np.ndarray:
        return to_class_space(labels, self.n_classes[dataset], self.classes, ignore=ignore)


def build_pool(root: Path, datasets: list[str], spec_of: Callable[[str], DatasetSpec], log: Log) -> Pool:
    """The pool of every ingested dataset among ``datasets`` (its scans that passed ingest).

    ``spec_of`` reads a dataset's description (its class count and modality); a dataset whose folder was
    removed or broke since ingest is left out, and ``log`` says so.
    """
    layouts = {k: DatasetLayout(root, k) for k in sorted(datasets)}
    layouts = {k: v for k, v in layouts.items() if v.manifest.exists()}
    specs = {}
    for name in layouts:
        try:
            specs[name] = spec_of(name)
        except Exception as exc:  # any failure to read the description leaves only this dataset out
            log(f"dataset {name} left out of the pool: {exc}")
    return Pool(
        layouts={k: v for k, v in layouts.items() if k in specs},
        n_classes={k: spec.n_classes for k, spec in specs.items()},
        scans={k: ok_scans(layouts[k]) for k in specs},
        modality={k: spec.modality for k, spec in specs.items()},
    )


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


def recipe_key(profile: nnunet.Profile) -> str:
    """What a model's training recipe is, beyond its data: the profile (trainer, sampling, budget) and the
    trainer's weights."""
    extra = (f"seed {profile.seed}",) if profile.seed else ()
    if profile.warm_start_epochs:
        extra += (f"warm start {profile.warm_start_epochs}",)
    return cache_key(repr(profile), nnunet.trainer_identity(profile), *extra)[:16]


def models_state(root: Path, datasets: list[str], recipe: str | None = None) -> ModelsState:
    """Are the pooled models current for ``datasets``: each stage has a complete current model whose training
    set holds a case of every one of them, trained with ``recipe`` (``recipe_key``) when given? (Scans added
    to a dataset since do not make a model stale: they get predictions from it.) Dagster-free: reads the
    stages' ``current.json`` and model folders."""
    versions: dict[str, str] = {}
    for stage in STAGES:
        pointer_path = model_pointer(root, stage)
        if not pointer_path.exists():
            return ModelsState(False, f"no {stage} model yet", versions)
        pointer = json.loads(pointer_path.read_text())
        if not (Path(pointer["model_dir"]) / nnunet.MODEL_INFO_FILE).exists():
            return ModelsState(False, f"the current {stage} model {pointer['version']} is missing", versions)
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
        versions[stage] = pointer["version"]
    return ModelsState(True, "", versions)


def scan_key(layout: DatasetLayout, scan: str) -> str:
    return sha256_file(layout.scan_image(scan))[:24]


def scan_roi(layout: DatasetLayout, scan: str, margin_mm: float | None) -> Roi | None:
    """The scan's muscle box from its propagated mask (None: whole slices, by profile or empty mask)."""
    if margin_mm is None or not layout.masks(scan).exists():
        return None
    return roi_from_mask(read_image(layout.masks(scan)), margin_mm)


def input_key(content_key: str, roi: Roi | None) -> str:
    """What a prediction depends on: the scan's content (``scan_key``) and the box it is cropped to."""
    return content_key + ("" if roi is None else f"-{roi.key()}")


def predict_scan(predictor: nnunet.Predictor, img: sitk.Image, roi: Roi | None) -> sitk.Image:
    """One scan's labels on its full canonical grid (predicted inside ``roi`` when given)."""
    if roi is None:
        arr = predictor.predict(img)
    else:
        size = img.GetSize()
        arr = roi.paste(predictor.predict(roi.crop(img)), (size[2], size[1], size[0]))
    out = sitk.GetImageFromArray(arr.astype(np.uint8))
    out.CopyInformation(img)
    return out


def exact_labels(layout: DatasetLayout) -> list[tuple[str, list[int], Path]]:
    """(scan, canonical slices, label file) of every label known exactly: the reference's further annotated
    slices (``refinement.holdout``) and the users' corrected slices (``refinement.corrections``)."""
    out = [(scan, z, layout.annotation) for scan, z in exact_label_slices(layout).items()]
    return out + [(scan, z, path) for scan, (z, path) in corrected_exact_labels(layout).items()]


def _exact_and_held_out(
    labels: dict[tuple[str, str], np.ndarray], pool: Pool
) -> dict[tuple[str, str], np.ndarray]:
    """The one path for labels known exactly (``exact_labels``): they replace whatever the stage would
    learn on their slices, and a scan the stage did not select trains on them alone. Then each reference's
    held-out slab becomes "ignore"; a label left with nothing but ignore is dropped (nnU-Net cannot sample
    from it)."""
    ignore_value = ignore_label(pool.classes)
    out = dict(labels)
    for dataset, layout in pool.layouts.items():
        for scan, slices, path in exact_labels(layout):
            if scan not in pool.scans[dataset]:
                continue
            truth = pool.to_pool(dataset, read_array(path))
            label = out.get((dataset, scan))
            label = np.full(truth.shape, ignore_value, np.uint8) if label is None else label.copy()
            label[slices] = truth[slices]
            out[(dataset, scan)] = label
        slab = held_out_slab(layout)
        if slab is None or (dataset, slab.scan) not in out:
            continue
        hidden = slab.hide(out[(dataset, slab.scan)], ignore_value)
        if (hidden != ignore_value).any():
            out[(dataset, slab.scan)] = hidden
        else:
            del out[(dataset, slab.scan)]
    return out


def _stage_labels(stage: str, pool: Pool, root: Path, rule: StageRule | None) -> tuple[pd.DataFrame, dict]:
    """Selection table and {(dataset, scan): label array in pool space} for the stage's training set, with
    every reference's annotated slab held out."""
    labels: dict[tuple[str, str], np.ndarray] = {}
    if stage == "stage1":
        rows = []
        for dataset, scan, layout in pool.items():
            if not layout.pseudo_label(scan).exists():
                continue
            arr = read_array(layout.pseudo_label(scan))
            ignore_value = ignore_label(pool.n_classes[dataset])
            n_kept = int((arr != ignore_value).reshape(arr.shape[0], -1).all(axis=1).sum())
            rows.append({"dataset": dataset, "scan": scan, "n_kept": n_kept, "selected": n_kept > 0})
            if n_kept > 0:
                labels[(dataset, scan)] = pool.to_pool(dataset, arr, ignore=True)
        return pd.DataFrame(rows), _exact_and_held_out(labels, pool)

    previous, compare_to = PREVIOUS[stage]
    prev = current_model(root, previous)
    other = current_model(root, compare_to) if compare_to else None
    rows, preds = [], {}
    for dataset, scan, layout in pool.items():
        pred_path = stage_prediction(Path(prev["model_dir"]), dataset, scan)
        if not pred_path.exists():
            continue
        if other is None and not layout.masks(scan).exists():
            # a dataset whose scans were ingested but that failed before propagation (e.g. an unreadable
            # annotation): stage 1 predicted its scans, but there is nothing to compare them with
            continue
        pred = read_array(pred_path)
        if other is None:  # stage 2 compares stage-1 predictions with the propagated masks
            ref = read_array(layout.masks(scan))
            ref = pool.to_pool(dataset, ref)
        else:
            ref_path = stage_prediction(Path(other["model_dir"]), dataset, scan)
            if not ref_path.exists():
                continue
            ref = read_array(ref_path)
        score = mean_dice(pred, ref, pool.classes)
        agree, slices_relaxed = slice_agreement(pred, ref, pool.classes, rule.min_slice_dice)
        rows.append(
            {
                "dataset": dataset,
                "scan": scan,
                "mean_dice": score,
                "smooth_ok": volume_smooth(pred, pool.classes, rule.area_ratio),
                "n_kept": int(agree.sum()),
                "slices_relaxed": slices_relaxed,
            }
        )
        preds[(dataset, scan)] = (pred, agree)
    if not rows:
        raise RefinementError(
            f"{stage}: no {previous} predictions to learn from; rematerialize nnunet_{previous}"
        )
    selection = select_stage_cases(pd.DataFrame(rows), rule)
    selection["relaxed"] = selection.relaxed | (selection.selected & selection.slices_relaxed)
    for row in selection[selection.selected & (selection.n_kept > 0)].itertuples():
        pred, agree = preds[(row.dataset, row.scan)]
        labels[(row.dataset, row.scan)] = finished_label(pool, row.dataset, row.scan, pred, agree)
    return selection, _exact_and_held_out(labels, pool)


def finished_label(
    pool: Pool, dataset: str, scan: str, prediction: np.ndarray, agree: np.ndarray
) -> np.ndarray:
    """A later stage's training label from the previous stage's prediction: finished on the scan's image as
    a final mask is (``refinement.finishing``), so the raw prediction's excess is not learned as label; and
    nnU-Net's ignore on the slices where the two compared masks disagree, whose errors (e.g. false positives
    on a neighbouring muscle) would otherwise be learned and reinforced stage after stage."""
    image = read_image(pool.layouts[dataset].scan_image(scan))
    label = finish_refined(prediction, image, pool.modality[dataset], pool.classes)
    label[~agree] = ignore_label(pool.classes)
    return label


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
    cases: list[nnunet.TrainingCase] = []
    recipe = recipe_key(profile)
    parts = [stage, VERSION, recipe, pool.classes, use_ignore]
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
        case_id = f"{dataset}__{scan}"
        cases.append(nnunet.TrainingCase(case_id, image_path, label_path))
        parts += [dataset, scan, input_key(scan_key(layout, scan), roi), sha256_file(label_path)[:16]]
        if profile.foreground_sampling == "supervoxels":
            points, digest = supervoxel_points(
                layout, scan, roi, sitk.GetArrayFromImage(label), ignore_label(pool.classes)
            )
            sampling[case_id] = points
            parts.append(digest)
    warm_start, warm_version = _warm_start(stage, root, profile)
    if warm_start is not None:  # a fresh start's key stays as it was, so existing models stay current
        parts.append(warm_version)
    version = cache_key(*parts)[:16]
    model_dir = model_version_dir(root, stage, version)
    trained_now, t_train, per_iter = False, 0.0, float("nan")
    if not (model_dir / nnunet.MODEL_INFO_FILE).exists():
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
    # lineage of the exact labels trained on: {dataset/scan: canonical slices}
    exact: dict[str, list[int]] = {}
    for dataset, layout in pool.layouts.items():
        for scan, slices, _ in exact_labels(layout):
            key = f"{dataset}/{scan}"
            exact[key] = sorted(set(exact.get(key, [])) | set(slices))
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


def _warm_start(stage: str, root: Path, profile: nnunet.Profile) -> tuple[nnunet.WarmStart | None, str]:
    """Where a later stage starts from when the profile warm-starts (the previous stage's current model), and
    that model's version for the new one's key."""
    if stage not in PREVIOUS or not profile.warm_start_epochs:
        return None, ""
    pointer = current_model(root, PREVIOUS[stage][0])
    checkpoint = nnunet.ModelInfo.from_dir(Path(pointer["model_dir"])).checkpoint
    return nnunet.WarmStart(checkpoint, profile.warm_start_epochs), pointer["version"]


def supervoxel_points(
    layout: DatasetLayout, scan: str, roi: Roi | None, labels: np.ndarray, ignore_label: int
) -> tuple[dict[int, np.ndarray] | None, str]:
    """The scan's supervoxel patch centres on its training crop, and what they were made from. A scan without
    supervoxels (the asset not materialized, or the scan added since) keeps nnU-Net's own draw: None."""
    path = layout.supervoxels(scan)
    if not path.exists():
        return None, "no-supervoxels"
    image = read_image(path)
    supervoxels = sitk.GetArrayFromImage(roi.crop(image) if roi is not None else image)
    return sampling_points(supervoxels, labels, ignore_label), sha256_file(path)[:16]


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


class StagePredictions:
    """One stage's per-scan predictions, cached by scan content and box; its nnU-Net predictor loads at most
    once, and only when some scan needs predicting."""

    def __init__(self, model_dir: Path, device: str):
        self.model_dir, self.device = Path(model_dir), device
        self._predictor: nnunet.Predictor | None = None

    @property
    def loaded(self) -> bool:
        return self._predictor is not None

    def ensure(
        self, dataset: str, scan: str, image: Callable[[], sitk.Image], content_key: str, roi: Roi | None
    ) -> tuple[Path, bool]:
        """The scan's prediction file, predicted now (``image()`` read only then) unless it is current.
        Returns (path, predicted now)."""
        path = stage_prediction(self.model_dir, dataset, scan)
        cache = ScanCache(path.parent)
        key = input_key(content_key, roi)
        if cache.is_fresh(scan, key, [path]):
            return path, False
        if self._predictor is None:
            self._predictor = nnunet.Predictor.load(self.model_dir, device=self.device)
        atomic_write_image(predict_scan(self._predictor, image(), roi), path)
        cache.record(scan, key)
        return path, True


def predict_pool(
    model_dir: Path, pool: Pool, device: str, log: Log, roi_margin_mm: float | None = None
) -> int:
    """Predict every scan of the pool with one predictor load; cached per scan content (and box)."""
    predictions, n = StagePredictions(model_dir, device), 0
    for dataset, scan, layout in pool.items():
        roi = scan_roi(layout, scan, roi_margin_mm)
        _, predicted = predictions.ensure(
            dataset,
            scan,
            lambda layout=layout, scan=scan: read_image(layout.scan_image(scan)),
            scan_key(layout, scan),
            roi,
        )
        n += predicted
    log(f"predicted {n} scan(s) with {model_dir.name}")
    return n


def run_stage1(pool: Pool, root: Path, profile: nnunet.Profile, log: Log = print) -> StageResult:
    selection, labels = _stage_labels("stage1", pool, root, None)
    return _train_and_predict(
        "stage1", pool, root, profile, selection, labels, True, log, "the propagated pseudo-labels"
    )


def next_stage_labels(
    stage: str, pool: Pool, root: Path, rule: StageRule, log: Log = print
) -> tuple[pd.DataFrame, dict, str]:
    """A later stage's selection table, training labels and where the labels come from.

    Where the previous models agree with their reference on no slice outside the held-out slabs (a training
    budget too small to learn the muscles, or scans that defeat the models), the stage learns from the
    propagated pseudo-labels, as stage 1 does, rather than failing the run: the final masks' held-out check
    still decides whether a refined mask is used. Every dataset is then marked relaxed, so the stage's check
    warns."""
    previous, compare_to = PREVIOUS[stage]
    reference = f"{compare_to} predictions" if compare_to else "propagated masks"
    selection, labels = _stage_labels(stage, pool, root, rule)
    if labels:
        agree = f"slice Dice >= {rule.min_slice_dice}"
        return (
            selection,
            labels,
            f"{previous} predictions, finished on the image, on slices agreeing with the {reference} ({agree})",
        )
    source = f"the stage-1 pseudo-labels: no {previous} prediction agreed with the {reference}"
    log(f"{stage}: training on {source}")
    pseudo, labels = _stage_labels("stage1", pool, root, None)
    if pseudo.empty:
        return selection, labels, source
    agreement = selection.set_index(["dataset", "scan"])[["mean_dice", "smooth_ok"]]
    return pseudo.join(agreement, on=["dataset", "scan"]).assign(relaxed=True), labels, source


def run_next_stage(
    stage: str, pool: Pool, root: Path, profile: nnunet.Profile, rule: StageRule, log: Log = print
) -> StageResult:
    selection, labels, source = next_stage_labels(stage, pool, root, rule, log)
    return _train_and_predict(stage, pool, root, profile, selection, labels, True, log, source)
