"""Ingest assets: scans, the one reference annotation, and the advisory reference ranking."""

from typing import Any

import dagster as dg

from nnsam2_assets.core.imaging import read_array
from nnsam2_assets.core.overlays import markdown_image, montage_png, overlay_png
from nnsam2_assets.defs.automation import EAGER
from nnsam2_assets.defs.metadata import table
from nnsam2_assets.defs.partitions import datasets_partitions
from nnsam2_assets.defs.resources import NnsamStorage
from nnsam2_assets.ingest import annotation, ranking
from nnsam2_assets.ingest import scans as ingest
from nnsam2_assets.ingest.convention import folder_fingerprint
from nnsam2_assets.refinement.corrections import RecordedCorrections, record_corrections


@dg.asset(
    partitions_def=datasets_partitions,
    group_name="ingest",
    kinds={"nifti"},
    code_version=ingest.VERSION,
    check_specs=[
        dg.AssetCheckSpec("all_scans_readable", asset="scans"),
        dg.AssetCheckSpec(
            "any_scan_readable",
            asset="scans",
            blocking=True,
            description="at least one scan was ingested (otherwise nothing downstream can run)",
        ),
        dg.AssetCheckSpec(
            "regions_certain",
            asset="scans",
            description="every region found from the reference's is unique enough, of a plausible length "
            "and inside its scan (a regions.csv row settles one that is not)",
        ),
        dg.AssetCheckSpec(
            "no_ingest_warnings",
            asset="scans",
            description="no scan was accepted with a warning (oblique, expert labels ignored) and no "
            "regions.csv row was ignored",
        ),
    ],
)
def scans(context: dg.AssetExecutionContext, storage: NnsamStorage) -> dg.MaterializeResult:
    """Every scan of the dataset, reoriented to LPS, cropped to its region (L3/L4 to L5/S1), in original units.

    Dixon water and fat are paired by array index; expert labels are aligned in physical space. A bad scan
    is reported (a failed check and a row in the manifest) and excluded; the other scans go on.
    """
    spec = storage.dataset(context.partition_key)
    layout = storage.layout(context.partition_key)
    # taken before the files are read: one that arrives during the ingest is a change the sweep still sees
    fingerprint = folder_fingerprint(spec.folder)
    report = ingest.ingest_scans(spec, layout, log=context.log.error)
    # corrections placed on the crops just ingested, before any model or final mask of this run reads them
    # (a sensor records them before its run, on the crops the run may then change)
    place_corrections(context.instance, context.log, storage, context.partition_key)
    manifest, failed, good = report.manifest, report.failed, report.good
    warnings = list(spec.warnings) + [f"{r.scan}: {r.warnings}" for r in good.itertuples() if r.warnings]
    metadata: dict[str, object] = {
        "n_scans": len(manifest),
        "n_ok": len(good),
        "n_failed": len(failed),
        "n_recomputed": report.computed,
        "input_fingerprint": fingerprint,
        "modality": spec.modality,
        "sequence": spec.sequence,
        "classes": ", ".join(spec.class_names),
        "scans": table(
            manifest,
            [
                "scan",
                "status",
                "shape_zyx",
                "spacing_mm",
                "region",
                "region_source",
                "region_confidence",
                "l4_l5",
                "error",
                "warnings",
                "notes",
            ],
        ),
        "path": dg.MetadataValue.path(str(layout.dir("scans"))),
    }
    if len(good):
        first = good.iloc[0]["scan"]
        image = read_array(layout.scan_image(first))
        metadata["preview"] = dg.MetadataValue.md(markdown_image(montage_png(image, None), f"{first}"))
        metadata["regions"] = dg.MetadataValue.md(region_previews(layout, good))
    uncertain = good[good["region_uncertain"].eq(True)] if "region_uncertain" in good else good.iloc[:0]
    checks = [
        dg.AssetCheckResult(
            check_name="regions_certain",
            passed=len(uncertain) == 0,
            severity=dg.AssetCheckSeverity.WARN,
            metadata={"uncertain": table(uncertain, ["scan", "region", "region_confidence", "warnings"])},
            description=("; ".join(uncertain.warnings.tolist())[:1000] if len(uncertain) else "")
            or f"{int((good['region_source'] == 'found').sum()) if len(good) else 0} regions found, none uncertain",
        ),
        dg.AssetCheckResult(
            check_name="all_scans_readable",
            passed=len(failed) == 0,
            severity=dg.AssetCheckSeverity.ERROR,
            metadata={"failed": table(failed, ["scan", "error"])},
            description="; ".join(failed.error.tolist())[:1000] or "all scans ingested",
        ),
        dg.AssetCheckResult(
            check_name="no_ingest_warnings",
            passed=not warnings,
            severity=dg.AssetCheckSeverity.WARN,
            description="; ".join(warnings)[:1000] or "no warnings",
        ),
        dg.AssetCheckResult(
            check_name="any_scan_readable",
            passed=len(good) > 0,
            severity=dg.AssetCheckSeverity.ERROR,
            description=f"{len(good)} of {len(manifest)} scans ingested",
        ),
    ]
    return dg.MaterializeResult(
        metadata=metadata, check_results=checks, data_version=dg.DataVersion(report.data_version)
    )


def region_previews(layout, good, limit: int = 8) -> str:
    """Each scan's region on a sagittal reformat (discs: red and yellow bounds, cyan L4/L5)."""
    rows = []
    for row in list(good.itertuples())[:limit]:
        png = layout.scan_region_preview(row.scan)
        if png.exists():
            source = getattr(row, "region_source", "")
            rows.append(
                f"**{row.scan}** {row.region or 'whole scan'} ({source}) "
                + markdown_image(png.read_bytes(), row.scan)
            )
    more = f"\n\n(first {limit} of {len(good)} scans)" if len(good) > limit else ""
    return "\n\n".join(rows) + more


@dg.asset(
    partitions_def=datasets_partitions,
    group_name="ingest",
    kinds={"nifti"},
    code_version=annotation.VERSION,
    automation_condition=EAGER,
    deps=[scans],
)
def reference_annotation(context: dg.AssetExecutionContext, storage: NnsamStorage) -> dg.MaterializeResult:
    """The annotated axial slice (or the few annotated slices), validated against the reference scan and put
    on its canonical crop. Click prompts (``annotation.mrk.json`` / ``annotation.csv``) become that slice's
    mask here."""
    spec = storage.dataset(context.partition_key)
    layout = storage.layout(context.partition_key)
    report = annotation.write_reference_annotation(spec, layout)
    labels = report.label_slice
    areas = {name: int((labels == c).sum()) for c, name in enumerate(spec.class_names, start=1)}
    return dg.MaterializeResult(
        metadata={
            "reference": spec.reference,
            "seed_slice": report.meta["seed_slice"],
            "prompt": report.meta["prompt"],  # "mask", or "clicks" made into the slice mask shown
            "n_clicks": report.meta["n_clicks"],
            "n_slices_in_region": report.n_slices,
            "class_areas_px": dg.MetadataValue.json(areas),
            "overlay": dg.MetadataValue.md(
                markdown_image(overlay_png(report.reference_slice, labels, spec.n_classes), "annotated slice")
            ),
            "path": dg.MetadataValue.path(str(layout.annotation)),
        },
        data_version=dg.DataVersion(report.data_version),
    )


@dg.asset(
    partitions_def=datasets_partitions,
    group_name="ingest",
    kinds={"pandas"},
    code_version=ranking.VERSION,
    automation_condition=EAGER,
    deps=[scans],
    check_specs=[dg.AssetCheckSpec("reference_is_representative", asset="reference_ranking")],
)
def reference_ranking(context: dg.AssetExecutionContext, storage: NnsamStorage) -> dg.MaterializeResult:
    """Advisory: which scan is most representative (medoid of image features at the top, middle, bottom).

    The reference code used DINOv2 features, whose weights cannot be had offline; these are weight-free.
    The user's annotation decides; this only suggests which scan to annotate for a new dataset.
    """
    layout = storage.layout(context.partition_key)
    spec = storage.dataset(context.partition_key)
    ranked = ranking.rank_dataset(spec, layout)
    best = str(ranked.iloc[0]["scan"]) if len(ranked) else ""
    rank, representative = ranking.reference_standing(ranked, spec.reference)
    check = dg.AssetCheckResult(
        check_name="reference_is_representative",
        passed=representative,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={"reference_rank": rank, "n_scans": len(ranked), "suggested_reference": best},
        description=(
            f"reference {spec.reference} ranks {rank} of {len(ranked)}"
            if representative
            else f"reference {spec.reference} ranks {rank} of {len(ranked)} (worse half; -1 = not ingested): "
            f"propagation from an outlying scan degrades every target; consider annotating {best}"
        ),
    )
    return dg.MaterializeResult(
        metadata={
            "suggested_reference": best,
            "current_reference": spec.reference,
            "reference_rank": rank,
            "ranking": table(ranked, ["scan", "rank", "mean_distance"]),
        },
        check_results=[check],
    )


corrections = dg.AssetSpec(
    "corrections",
    partitions_def=datasets_partitions,
    group_name="ingest",
    kinds={"nifti"},
    description=(
        "Final masks a user corrected (corrections/<scan>.nii.gz or .seg.nrrd in the dataset folder), each "
        "recorded with the digest of the final mask it was made from and its corrected slices. Recorded by "
        "the new-data sensor before the run it requests, and by every scans step (nnsam2 run's too), which "
        "places them on the crops it has just made. The record compares a correction with the published "
        "final mask: the one read outside the graph's edges, because the models it trains are upstream of "
        "the final masks it corrects."
    ),
)


def place_corrections(
    instance: dg.DagsterInstance, log: Any, storage: NnsamStorage, name: str
) -> RecordedCorrections | None:
    """``record_dataset_corrections``, logged on ``log`` (a context's logger); None where recording failed:
    one dataset's corrections never fail an ingest or stop the others' runs, they wait for the next run."""
    try:
        recorded = record_dataset_corrections(instance, storage, name)
    except Exception as exc:
        log.warning(f"{name}: corrections not recorded: {type(exc).__name__}: {exc}")
        return None
    if recorded.scans:
        log.info(f"{name}: corrections recorded for {', '.join(recorded.scans)}")
    for scan, reason in recorded.refused.items():
        log.warning(f"{name}: correction of {scan} refused: {reason}")
    return recorded


def record_dataset_corrections(
    instance: dg.DagsterInstance, storage: NnsamStorage, name: str
) -> RecordedCorrections:
    """Record the dataset's new, changed or removed corrections and report them as a materialization of
    ``corrections``."""
    recorded = record_corrections(storage.dataset(name), storage.layout(name))
    if recorded.changed or recorded.removed:
        instance.report_runless_asset_event(
            dg.AssetMaterialization(
                "corrections",
                partition=name,
                metadata={
                    "corrected_slices": dg.MetadataValue.json(
                        {scan: r.corrected_slices for scan, r in recorded.changed.items()}
                    ),
                    "base_mask_sha256": dg.MetadataValue.json(
                        {scan: r.base_mask_sha256 for scan, r in recorded.changed.items()}
                    ),
                    "removed": ", ".join(recorded.removed) or "none",
                },
            )
        )
    return recorded
