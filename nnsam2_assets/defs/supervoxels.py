"""Supervoxels asset (optional): each scan's seed slice cut into segments and carried through the scan."""

import functools

import dagster as dg

from nnsam2_assets.defs.automation import GPU_TAGS
from nnsam2_assets.defs.ingest import reference_annotation, scans
from nnsam2_assets.defs.metadata import table
from nnsam2_assets.defs.partitions import datasets_partitions
from nnsam2_assets.defs.propagation import propagated_masks
from nnsam2_assets.defs.resources import NnsamStorage, PropagationSettings
from nnsam2_assets.supervoxels import steps as supervoxel_steps


@dg.asset(
    partitions_def=datasets_partitions,
    group_name="supervoxels",
    kinds={"nifti", "torch"},
    code_version=supervoxel_steps.VERSION,
    deps=[scans, reference_annotation, propagated_masks],
    pool="gpu",
    op_tags=GPU_TAGS,
)
def supervoxels(
    context: dg.AssetExecutionContext, storage: NnsamStorage, propagation: PropagationSettings
) -> dg.MaterializeResult:
    """Supervoxels per scan: the seed slice (the reference's annotated slice, each target's seed level) cut
    into segments inside the propagated muscles plus 10 mm, carried through the scan. With a SAM2 checkpoint:
    SAM2's automatic masks (predicted IoU >= 0.92), propagated by SAM2; without one: scikit-image SLIC,
    carried by the registration chain. The nnU-Net stages centre their foreground patches on them when the
    refinement resource says ``foreground_sampling: supervoxels``. Not part of a default run."""
    layout, choice = storage.layout(context.partition_key), propagation.config()
    report = supervoxel_steps.build_supervoxels(
        storage.dataset(context.partition_key),
        layout,
        functools.partial(supervoxel_steps.method_for, choice),
        supervoxel_steps.method_id_for(choice),
        log=context.log.info,
    )
    summary = report.summary
    metadata = {
        "method": "sam2" if report.model_id.startswith("sam2|") else "slic",
        "method_id": report.model_id,
        "n_scans": len(summary),
        "n_recomputed": report.computed,
        "mean_seed_segments": float(summary.n_seed_segments.mean()) if len(summary) else 0.0,
        "mean_supervoxels": float(summary.n_supervoxels.mean()) if len(summary) else 0.0,
        "scans": table(summary, ["scan", "seed_slice", "n_seed_segments", "n_supervoxels", "covered_slices"]),
        "folder": dg.MetadataValue.path(str(layout.dir("supervoxels"))),
    }
    return dg.MaterializeResult(metadata=metadata, data_version=dg.DataVersion(report.data_version))
