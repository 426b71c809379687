"""Refinement: three sequential nnU-Net v2 models trained on pseudo-labels pooled across all datasets.

Each model asset trains once on the pooled, filtered cases of every registered dataset, then predicts every
scan with one predictor load, so a model is never retrained per dataset. Models live under
``<root>/models/<stage>/<version>/`` where the version hashes the training inputs and the profile: an
unchanged rematerialization reuses the model, and a changed input makes a new folder (never overwritten).
Training is on demand (or the weekly schedule), not eager: a new scan gets final masks from the current
stage-3 model without retraining.
"""

import dagster as dg

from nnsam2_assets.core.overlays import markdown_image
from nnsam2_assets.defs.automation import EAGER_BESIDE_CORRECTIONS, GPU_TAGS
from nnsam2_assets.defs.ingest import corrections, reference_annotation, scans
from nnsam2_assets.defs.metadata import table
from nnsam2_assets.defs.partitions import datasets_partitions
from nnsam2_assets.defs.propagation import propagated_masks
from nnsam2_assets.defs.pseudolabels import pseudo_labels
from nnsam2_assets.defs.resources import NnsamStorage, PropagationSettings, RefinementSettings
from nnsam2_assets.ingest.annotation import describe_split_source
from nnsam2_assets.propagation.steps import propagated_scans
from nnsam2_assets.refinement import stages as refine
from nnsam2_assets.refinement.final_masks import CODE_VERSION as FINAL_MASKS_CODE_VERSION
from nnsam2_assets.refinement.final_masks import (
    final_masks_version,
    make_final_masks,
    scans_without_final_mask,
)
from nnsam2_assets.refinement.holdout import MIN_HELDOUT_DICE
from nnsam2_assets.refinement.pool import Pool, build_pool
from nnsam2_assets.refinement.rules import STAGE_RULES, StageRule


class StageSelectionConfig(dg.Config):
    """Agreement filter for the stage's training cases (nnsam2 step 7); see ``STAGE_RULES`` for defaults."""

    min_mean_dice: float = -1.0  # < 0: the stage's default (0.90 for stage 2, 0.95 for stage 3)
    area_ratio: float = -1.0
    top_fraction: float = -1.0
    min_per_dataset: int = StageRule.min_per_dataset
    min_slice_dice: float = StageRule.min_slice_dice

    def rule(self, stage: str) -> StageRule:
        base = STAGE_RULES[stage]
        return StageRule(
            min_mean_dice=self.min_mean_dice if self.min_mean_dice >= 0 else base.min_mean_dice,
            area_ratio=self.area_ratio if self.area_ratio > 0 else base.area_ratio,
            top_fraction=(self.top_fraction if self.top_fraction > 0 else base.top_fraction),
            min_per_dataset=self.min_per_dataset,
            min_slice_dice=self.min_slice_dice,
        )


def _pool(context: dg.AssetExecutionContext, storage: NnsamStorage) -> Pool:
    names = context.instance.get_dynamic_partitions(datasets_partitions.name)
    return build_pool(storage.root, names, storage.dataset, log=context.log.warning)


def _result(info: refine.StageResult) -> dg.MaterializeResult:
    sel = info.selection
    metadata = {
        "model_version": info.version,
        "model_dir": dg.MetadataValue.path(str(info.model_dir)),
        "trained_now": info.trained_now,
        "n_training_cases": int(sel.selected.sum()) if "selected" in sel else len(sel),
        "pooled_classes": info.n_classes,
        "profile": info.profile,
        # nnSAM says here whether a SAM2 encoder ran ("sam_encoder") or the shape head alone ("none")
        "trainer": dg.MetadataValue.json(info.trainer),
        "training_seconds": info.training_seconds,
        "seconds_per_iteration": info.seconds_per_iteration,
        "n_predicted_scans": info.n_predicted,
        "training_labels": info.label_source,
        # the annotated (not the held-out one) and corrected slices trained on as exact labels
        "exact_label_slices": dg.MetadataValue.json(info.exact_label_slices),
        "selection": table(
            sel, ["dataset", "scan", "mean_dice", "smooth_ok", "selected", "relaxed", "n_kept"]
        ),
    }
    checks = [
        dg.AssetCheckResult(
            check_name="selection_not_relaxed",
            passed=not info.relaxed,
            severity=dg.AssetCheckSeverity.WARN,
            description=f"fewer than the minimum passed the agreement filter; trained on {info.label_source}"
            if info.relaxed
            else "threshold met",
            metadata={"relaxed_datasets": ", ".join(info.relaxed_datasets) or "none"},
        )
    ]
    return dg.MaterializeResult(
        metadata=metadata,
        check_results=checks,
        data_version=dg.DataVersion(info.version),
    )


def _stage_asset_kwargs(stage: str, deps: list) -> dict:
    return {
        "name": f"nnunet_{stage}",
        "group_name": "refinement",
        "kinds": {"pytorch"},
        "code_version": refine.VERSION,
        "deps": deps,
        "pool": "gpu",
        "op_tags": GPU_TAGS,
        "check_specs": [dg.AssetCheckSpec("selection_not_relaxed", asset=f"nnunet_{stage}")],
    }


@dg.asset(
    **_stage_asset_kwargs(
        "stage1", [scans, reference_annotation, corrections, propagated_masks, pseudo_labels]
    )
)
def nnunet_stage1(
    context: dg.AssetExecutionContext,
    storage: NnsamStorage,
    refinement: RefinementSettings,
    propagation: PropagationSettings,
) -> dg.MaterializeResult:
    """Stage 1: nnU-Net trained on the pseudo-labels of every dataset (ignore label on dropped slices),
    then its predictions for every scan."""
    pool = _pool(context, storage)
    info = refine.run_stage1(pool, storage.root, refinement.profile_for(propagation), log=context.log.info)
    return _result(info)


def _next_stage_asset(stage: str, deps: list, description: str) -> dg.AssetsDefinition:
    """Stages 2 and 3 differ only in their inputs and their selection rule (``StageSelectionConfig``)."""

    @dg.asset(**_stage_asset_kwargs(stage, deps), description=description)
    def _stage(
        context: dg.AssetExecutionContext,
        storage: NnsamStorage,
        refinement: RefinementSettings,
        propagation: PropagationSettings,
        config: StageSelectionConfig,
    ) -> dg.MaterializeResult:
        pool = _pool(context, storage)
        profile = refinement.profile_for(propagation)
        info = refine.run_next_stage(
            stage, pool, storage.root, profile, config.rule(stage), log=context.log.info
        )
        return _result(info)

    return _stage


# pseudo_labels: where the previous models agree with their reference nowhere, a stage learns from the
# pseudo-labels as stage 1 does (``stage_labels.next_stage_labels``)
nnunet_stage2 = _next_stage_asset(
    "stage2",
    [scans, reference_annotation, corrections, propagated_masks, pseudo_labels, nnunet_stage1],
    "Stage 2: trained on stage-1 predictions that agree with the propagated masks and change area smoothly.",
)
nnunet_stage3 = _next_stage_asset(
    "stage3",
    [scans, reference_annotation, corrections, propagated_masks, pseudo_labels, nnunet_stage1, nnunet_stage2],
    "Stage 3: trained on stage-2 predictions that agree with stage 1 (top 20 % per dataset, at least 2).",
)


class FinalMasksConfig(dg.Config):
    """The held-out check's bar (``refinement.holdout``): 0 always takes the refined masks, above 1 always
    keeps the propagated ones."""

    min_heldout_dice: float = MIN_HELDOUT_DICE


@dg.asset(
    partitions_def=datasets_partitions,
    group_name="refinement",
    kinds={"nifti"},
    code_version=FINAL_MASKS_CODE_VERSION,
    automation_condition=EAGER_BESIDE_CORRECTIONS,
    # scans and propagated masks: the images predicted and the muscle box they are cropped to, the sides
    # the refined masks must agree with, and the masks kept when the held-out annotated slice
    # (reference_annotation) keeps them
    # corrections: the users' corrected slices replace the model's there
    deps=[
        scans,
        reference_annotation,
        corrections,
        propagated_masks,
        nnunet_stage1,
        nnunet_stage2,
        nnunet_stage3,
    ],
    pool="gpu",
    op_tags=GPU_TAGS,
    check_specs=[
        dg.AssetCheckSpec(
            "final_masks_complete",
            asset="final_masks",
            description="every scan that passed ingest has a non-empty final mask (one whose propagation "
            "failed is named)",
        ),
        dg.AssetCheckSpec(
            "refined_masks_used",
            asset="final_masks",
            description="the stage-3 model passed the held-out annotated slice, so its masks replace propagation",
        ),
        dg.AssetCheckSpec(
            "any_final_mask",
            asset="final_masks",
            blocking=True,
            description="at least one scan has a non-empty final mask (otherwise there is nothing to measure)",
        ),
    ],
)
def final_masks(
    context: dg.AssetExecutionContext,
    storage: NnsamStorage,
    refinement: RefinementSettings,
    config: FinalMasksConfig,
) -> dg.MaterializeResult:
    """Stage-3 predictions, largest component per class, kept where the propagated mask has the same side
    and their edges then placed on the image, on each scan's ORIGINAL grid (opens over the original scan in
    ITK-SNAP or Slicer); plus the stage-to-stage Dice per scan. Models load once per run. The propagated
    masks stand instead when the stage-3 model fails the held-out annotated slice."""
    name = context.partition_key
    layout = storage.layout(name)
    scan_ids = propagated_scans(layout)  # a scan whose propagation failed has nothing to compose
    out = make_final_masks(
        storage.dataset(name),
        layout,
        scan_ids,
        storage.root,
        refinement.device,
        log=context.log.info,
        min_heldout_dice=config.min_heldout_dice,
    )
    stage_dice = out.table
    metadata = {
        "n_scans": len(stage_dice),
        "n_recomputed": out.n_computed,
        "classes": ", ".join(out.class_names),
        "final_masks_source": out.decision.source,
        "final_rule": out.rule,
        "es_mf_split_from": describe_split_source(out.split_slices),
        # logit per mm; 0 when not applied (2-class, or several annotated levels)
        "es_mf_caudal_slope_per_mm": out.caudal_slope_per_mm or 0.0,
        "heldout_slice_dice": out.decision.heldout_dice,
        "min_heldout_slice_dice": out.decision.min_heldout_dice,
        "models": dg.MetadataValue.json(out.models),
        "stage_dice": table(
            stage_dice,
            ["scan", "stage1_vs_propagation", "stage2_vs_stage1", "stage3_vs_stage2", "expert_dice"],
        ),
        "path": dg.MetadataValue.path(str(layout.dir("final_masks"))),
    }
    if stage_dice.expert_dice.notna().any():
        metadata["mean_expert_dice"] = float(stage_dice.expert_dice.mean())
    if out.overlay_png:
        metadata["overlay"] = dg.MetadataValue.md(markdown_image(out.overlay_png, "final mask"))
    empty = stage_dice.scan[stage_dice.n_voxels == 0].tolist()
    missing = scans_without_final_mask(layout, stage_dice)
    checks = [
        dg.AssetCheckResult(
            check_name="final_masks_complete",
            passed=not missing and not empty,
            severity=dg.AssetCheckSeverity.ERROR,
            metadata={"missing_or_empty": ", ".join(missing + empty) or "none"},
        ),
        dg.AssetCheckResult(
            check_name="refined_masks_used",
            passed=out.decision.use_refined,
            severity=dg.AssetCheckSeverity.WARN,
            description=f"final masks are the {out.decision.source} masks: held-out slice Dice "
            f"{out.decision.heldout_dice:.3f} (refined masks need {out.decision.min_heldout_dice:.2f})",
        ),
        dg.AssetCheckResult(
            check_name="any_final_mask",
            passed=bool((stage_dice.n_voxels > 0).any()),
            severity=dg.AssetCheckSeverity.ERROR,
            description=f"{int((stage_dice.n_voxels > 0).sum())} of {len(scan_ids)} scans have a final mask",
        ),
    ]
    return dg.MaterializeResult(
        metadata=metadata, check_results=checks, data_version=dg.DataVersion(final_masks_version(layout))
    )
