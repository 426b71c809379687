"""The three nnU-Net stages over a pool of datasets, and the final masks (Dagster-free orchestration).

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

from nnsam2_assets.lib import nnunet
from nnsam2_assets.lib.cache import ScanCache, cache_key
from nnsam2_assets.lib.dataset import DatasetSpec, class_names
from nnsam2_assets.lib.imaging import read_image, to_original_grid
from nnsam2_assets.lib.layout import DatasetLayout, model_root, stage_prediction
from nnsam2_assets.lib.overlays import montage_png
from nnsam2_assets.lib.postprocess import clean_labels, to_class_space
from nnsam2_assets.lib.pseudolabels import (
    StageRule,
    dice_per_class,
    select_stage_cases,
    volume_smooth,
)
from nnsam2_assets.lib.roi import Roi, roi_from_mask
from nnsam2_assets.lib.storage import (
    atomic_write_dataframe,
    atomic_write_image,
    atomic_write_json,
    sha256_file,
)

STAGES = ("stage1", "stage2", "stage3")
STAGE_IDS = {"stage1": 901, "stage2": 902, "stage3": 903}
PREVIOUS = {"stage2": ("stage1", None), "stage3": ("stage2", "stage1")}

Log = Callable[[str], None]


class RefinementError(RuntimeError):
    pass


@dataclass
class Pool:
    layouts: dict[str, DatasetLayout]
    n_classes: dict[str, int]
    scans: dict[str, list[str]]

    @property
    def classes(self) -> int:
        return 4 if self.n_classes and all(k == 4 for k in self.n_classes.values()) else 2

    def items(self) -> Iterator[tuple[str, str, DatasetLayout]]:
        for dataset, scans in self.scans.items():
            for scan in scans:
                yield dataset, scan, self.layouts[dataset]

    def to_pool(self, dataset: str, labels: np.ndarray, ignore: bool = False) -> np.ndarray:
        return to_class_space(labels, self.n_classes[dataset], self.classes, ignore=ignore)


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

    @property
    def relaxed(self) -> bool:
        return bool(self.relaxed_datasets)


def current_model(root: Path, stage: str) -> dict:
    pointer = model_root(root, stage) / "current.json"
    if not pointer.exists():
        raise RefinementError(f"{pointer}: no {stage} model yet; materialize nnunet_{stage} first")
    return json.loads(pointer.read_text())


def _read(path: Path) -> tuple[sitk.Image, np.ndarray]:
    img = sitk.ReadImage(str(path))
    return img, sitk.GetArrayFromImage(img)


def _scan_key(layout: DatasetLayout, scan: str) -> str:
    return sha256_file(layout.scan_image(scan))[:24]


def scan_roi(layout: DatasetLayout, scan: str, margin_mm: float | None) -> Roi | None:
    """The scan's muscle box from its propagated mask (None: whole slices, by profile or empty mask)."""
    if margin_mm is None or not layout.masks(scan).exists():
        return None
    return roi_from_mask(sitk.ReadImage(str(layout.masks(scan))), margin_mm)


def _input_key(scan_key: str, roi: Roi | None) -> str:
    """What a prediction depends on: the scan's content (``_scan_key``) and the box it is cropped to."""
    return scan_key + ("" if roi is None else f"-{roi.key()}")


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


def _stage_labels(stage: str, pool: Pool, root: Path, rule: StageRule | None) -> tuple[pd.DataFrame, dict]:
    """Selection table and {(dataset, scan): label array in pool space} for the stage's training set."""
    labels: dict[tuple[str, str], np.ndarray] = {}
    if stage == "stage1":
        rows = []
        for dataset, scan, layout in pool.items():
            if not layout.pseudo_label(scan).exists():
                continue
            _, arr = _read(layout.pseudo_label(scan))
            ignore_value = pool.n_classes[dataset] + 1
            n_kept = int((arr != ignore_value).reshape(arr.shape[0], -1).all(axis=1).sum())
            rows.append({"dataset": dataset, "scan": scan, "n_kept": n_kept, "selected": n_kept > 0})
            if n_kept > 0:
                labels[(dataset, scan)] = pool.to_pool(dataset, arr, ignore=True)
        return pd.DataFrame(rows), labels

    previous, compare_to = PREVIOUS[stage]
    prev = current_model(root, previous)
    other = current_model(root, compare_to) if compare_to else None
    rows, preds = [], {}
    for dataset, scan, layout in pool.items():
        pred_path = stage_prediction(Path(prev["model_dir"]), dataset, scan)
        if not pred_path.exists():
            continue
        _, pred = _read(pred_path)
        if other is None:  # stage 2 compares stage-1 predictions with the propagated masks
            _, ref = _read(layout.masks(scan))
            ref = pool.to_pool(dataset, ref)
        else:
            ref_path = stage_prediction(Path(other["model_dir"]), dataset, scan)
            if not ref_path.exists():
                continue
            _, ref = _read(ref_path)
        score = float(np.mean(dice_per_class(pred, ref, pool.classes)))
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
        # slices where the two models disagree become "ignore": their errors (e.g. false positives on a
        # neighbouring muscle) would otherwise be learned and reinforced stage after stage
        label = pred.copy()
        label[~agree] = pool.classes + 1
        preds[(dataset, scan)] = label
    if not rows:
        raise RefinementError(
            f"{stage}: no {previous} predictions to learn from; rematerialize nnunet_{previous}"
        )
    selection = select_stage_cases(pd.DataFrame(rows), rule)
    selection["relaxed"] = selection.relaxed | (selection.selected & selection.slices_relaxed)
    for row in selection[selection.selected & (selection.n_kept > 0)].itertuples():
        labels[(row.dataset, row.scan)] = preds[(row.dataset, row.scan)]
    return selection, labels


def slice_agreement(
    pred: np.ndarray, ref: np.ndarray, n_classes: int, min_dice: float
) -> tuple[np.ndarray, bool]:
    """Per slice: do two label volumes agree (mean class Dice >= min_dice, both non-empty)? And was that relaxed?

    If no slice reaches ``min_dice`` the better-agreeing half of the non-empty slices is kept instead (relaxed),
    so a selected scan never contributes an all-ignore label (the stage's WARN check records relaxed datasets).
    """
    scores = np.full(pred.shape[0], -1.0)
    for z in range(pred.shape[0]):
        if pred[z].any() and ref[z].any():
            scores[z] = float(np.mean(dice_per_class(pred[z], ref[z], n_classes)))
    kept = scores >= min_dice
    if kept.any() or not (scores >= 0).any():
        return kept, False
    return scores >= np.median(scores[scores >= 0]), True


def agreeing_slices(pred: np.ndarray, ref: np.ndarray, n_classes: int, min_dice: float) -> np.ndarray:
    return slice_agreement(pred, ref, n_classes, min_dice)[0]


def _train_and_predict(
    stage: str,
    pool: Pool,
    root: Path,
    profile: nnunet.Profile,
    selection: pd.DataFrame,
    labels: dict,
    use_ignore: bool,
    log: Log,
) -> StageResult:
    if not labels:
        raise RefinementError(
            f"{stage}: no usable training case in {len(pool.layouts)} dataset(s) "
            f"({', '.join(pool.layouts) or 'none registered'}); every pseudo-label was dropped or missing"
        )
    staging = model_root(root, stage) / "staging"
    cases, parts = [], [stage, REFINEMENT_CODE, repr(profile), pool.classes, use_ignore]
    for (dataset, scan), arr in sorted(labels.items()):
        layout = pool.layouts[dataset]
        img = sitk.ReadImage(str(layout.scan_image(scan)))
        label = sitk.GetImageFromArray(arr.astype(np.uint8))
        label.CopyInformation(img)
        image_path, label_path = layout.scan_image(scan), staging / dataset / f"{scan}.nii.gz"
        roi = scan_roi(layout, scan, profile.roi_margin_mm)
        if roi is not None:
            image_path = staging / dataset / "images" / f"{scan}.nii.gz"
            atomic_write_image(roi.crop(img), image_path)
            label = roi.crop(label)
        atomic_write_image(label, label_path)
        cases.append(nnunet.TrainingCase(f"{dataset}__{scan}", image_path, label_path))
        parts += [dataset, scan, _input_key(_scan_key(layout, scan), roi), sha256_file(label_path)[:16]]
    version = cache_key(*parts)[:16]
    model_dir = model_root(root, stage) / version
    trained_now, t_train, per_iter = False, 0.0, float("nan")
    if not (model_dir / nnunet.MODEL_INFO_FILE).exists():
        log(f"{stage}: training on {len(cases)} cases ({profile.name} profile) into {model_dir}")
        t0 = time.perf_counter()
        info = nnunet.train_model(
            cases=cases,
            class_names=list(class_names(pool.classes)),
            use_ignore=use_ignore,
            work_root=Path(root) / "nnunet",
            model_dir=model_dir,
            profile=profile,
            dataset_id=STAGE_IDS[stage],
        )
        t_train, trained_now = time.perf_counter() - t0, True
        per_iter = float(getattr(info, "seconds_per_iteration", float("nan")))
    else:
        log(f"{stage}: model {version} already trained on these inputs; reusing it")
    n_pred = predict_pool(model_dir, pool, profile.device, log, profile.roi_margin_mm)
    atomic_write_json(
        {
            "version": version,
            "model_dir": str(model_dir),
            "n_classes": pool.classes,
            "stage": stage,
            "roi_margin_mm": profile.roi_margin_mm,
        },
        model_root(root, stage) / "current.json",
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
    )


REFINEMENT_CODE = "refine-v2"


def predict_pool(
    model_dir: Path, pool: Pool, device: str, log: Log, roi_margin_mm: float | None = None
) -> int:
    """Predict every scan of the pool with one predictor load; cached per scan content (and box)."""
    predictor, n = None, 0
    for dataset, scan, layout in pool.items():
        out = stage_prediction(model_dir, dataset, scan)
        cache = ScanCache(out.parent)
        roi = scan_roi(layout, scan, roi_margin_mm)
        key = _input_key(_scan_key(layout, scan), roi)
        if cache.is_fresh(scan, key, [out]):
            continue
        if predictor is None:
            predictor = nnunet.Predictor.load(model_dir, device=device)
        img = sitk.ReadImage(str(layout.scan_image(scan)))
        atomic_write_image(predict_scan(predictor, img, roi), out)
        cache.record(scan, key)
        n += 1
    log(f"predicted {n} scan(s) with {model_dir.name}")
    return n


def run_stage1(pool: Pool, root: Path, profile: nnunet.Profile, log: Log = print) -> StageResult:
    selection, labels = _stage_labels("stage1", pool, root, None)
    return _train_and_predict("stage1", pool, root, profile, selection, labels, True, log)


def run_next_stage(
    stage: str, pool: Pool, root: Path, profile: nnunet.Profile, rule: StageRule, log: Log = print
) -> StageResult:
    selection, labels = _stage_labels(stage, pool, root, rule)
    return _train_and_predict(stage, pool, root, profile, selection, labels, True, log)


@dataclass
class FinalMasks:
    table: pd.DataFrame
    n_computed: int
    class_names: tuple[str, ...]
    models: dict
    overlay_png: bytes | None


def make_final_masks(
    spec: DatasetSpec, layout: DatasetLayout, scans: list[str], root: Path, device: str, log: Log = print
) -> FinalMasks:
    """Final masks for one dataset from the current stage-3 model, with the stage-to-stage agreement table.

    Scans the models have not seen (new scans) are predicted here; each stage's predictor loads at most once
    per run. Output: the cleaned stage-3 mask on the canonical crop and on the original scan's grid.
    """
    models = {stage: current_model(root, stage) for stage in STAGES}
    k = int(models["stage3"]["n_classes"])
    predictors: dict[str, nnunet.Predictor] = {}
    cache = ScanCache(layout.dir("final_masks"))
    rows, computed, overlay = [], 0, None
    margins = {stage: models[stage].get("roi_margin_mm") for stage in STAGES}

    def prediction(stage: str, scan: str, img: sitk.Image, scan_key: str, roi: Roi | None) -> np.ndarray:
        model_dir = Path(models[stage]["model_dir"])
        path = stage_prediction(model_dir, spec.name, scan)
        pcache = ScanCache(path.parent)
        input_key = _input_key(scan_key, roi)
        if not pcache.is_fresh(scan, input_key, [path]):
            if stage not in predictors:
                predictors[stage] = nnunet.Predictor.load(model_dir, device=device)
            atomic_write_image(predict_scan(predictors[stage], img, roi), path)
            pcache.record(scan, input_key)
        return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))

    for scan in scans:
        img = sitk.ReadImage(str(layout.scan_image(scan)))
        scan_key = _scan_key(layout, scan)
        # the stages share one profile, hence one margin: the mask is read and the scan hashed once per scan
        rois = {m: scan_roi(layout, scan, m) for m in set(margins.values())}
        key = cache_key(scan_key, models["stage3"]["version"], "final-v1")
        outputs = [layout.final_mask(scan), layout.final_mask_canonical(scan)]
        p1, p2, p3 = (prediction(s, scan, img, scan_key, rois[margins[s]]) for s in STAGES)
        if not cache.is_fresh(scan, key, outputs):
            final = clean_labels(p3, k)
            canonical = sitk.GetImageFromArray(final)
            canonical.CopyInformation(img)
            atomic_write_image(canonical, layout.final_mask_canonical(scan))
            original = read_image(spec.scans[scan].image)
            atomic_write_image(to_original_grid(canonical, original), layout.final_mask(scan))
            cache.record(scan, key)
            computed += 1
        final = sitk.GetArrayFromImage(sitk.ReadImage(str(layout.final_mask_canonical(scan))))
        propagated = to_class_space(
            sitk.GetArrayFromImage(sitk.ReadImage(str(layout.masks(scan)))), spec.n_classes, k
        )
        row = {
            "scan": scan,
            "stage1_vs_propagation": float(np.mean(dice_per_class(p1, propagated, k))),
            "stage2_vs_stage1": float(np.mean(dice_per_class(p2, p1, k))),
            "stage3_vs_stage2": float(np.mean(dice_per_class(p3, p2, k))),
            "n_voxels": int((final > 0).sum()),
            "mask_sha256": sha256_file(layout.final_mask_canonical(scan))[:16],
            "expert_dice": np.nan,
        }
        if layout.scan_expert(scan).exists():
            truth = to_class_space(
                sitk.GetArrayFromImage(sitk.ReadImage(str(layout.scan_expert(scan)))), spec.n_classes, k
            )
            row["expert_dice"] = float(np.mean(dice_per_class(final, truth, k)))
            row["propagation_expert_dice"] = float(np.mean(dice_per_class(propagated, truth, k)))
        rows.append(row)
        if overlay is None:
            overlay = montage_png(sitk.GetArrayFromImage(img), final)
    cache.forget_others(set(scans))
    table = pd.DataFrame(rows)
    atomic_write_dataframe(
        table.assign(dataset=spec.name), layout.dir("final_masks") / "stage_agreement.parquet"
    )
    log(f"final masks: {computed} recomputed of {len(scans)}; predictors loaded: {sorted(predictors)}")
    return FinalMasks(
        table=table,
        n_computed=computed,
        class_names=class_names(k),
        models={s: m["version"] for s, m in models.items()},
        overlay_png=overlay,
    )
