"""Ingest assets: scans, the one reference annotation, and the advisory reference ranking."""

import dagster as dg
import numpy as np
import pandas as pd
import SimpleITK as sitk

from nnsam2_assets.defs.common import (
    EAGER,
    dataset_layout,
    md_table,
    ok_scans,
    read_manifest,
)
from nnsam2_assets.defs.partitions import datasets_partitions
from nnsam2_assets.defs.resources import NnsamStorage
from nnsam2_assets.lib.cache import ScanCache, cache_key
from nnsam2_assets.lib.dataset import folder_fingerprint, validate_annotation
from nnsam2_assets.lib.imaging import ScanError, read_image
from nnsam2_assets.lib.ingest import prepare_scan, source_hash
from nnsam2_assets.lib.overlays import markdown_image, montage_png, overlay_png
from nnsam2_assets.lib.ranking import rank_references
from nnsam2_assets.lib.storage import (
    atomic_write_dataframe,
    atomic_write_image,
    atomic_write_json,
    sha256_file,
)

INGEST_VERSION = "ingest-v1"


@dg.asset(
    partitions_def=datasets_partitions,
    group_name="ingest",
    kinds={"nifti"},
    code_version=INGEST_VERSION,
    check_specs=[dg.AssetCheckSpec("all_scans_readable", asset="scans")],
)
def scans(context: dg.AssetExecutionContext, storage: NnsamStorage) -> dg.MaterializeResult:
    """Every scan of the dataset, reoriented to LPS, cropped to its region (L3/L4 to L5/S1), in original units.

    Dixon water and fat are paired by array index; expert labels are aligned in physical space. A bad scan
    is reported (a failed check and a row in the manifest) and excluded; the other scans go on.
    """
    spec = storage.dataset(context.partition_key)
    layout = dataset_layout(storage, context.partition_key)
    cache = ScanCache(layout.dir("scans"))
    previous = read_manifest(layout)
    rows, computed = [], 0
    for scan_id, source in spec.scans.items():
        try:
            key = cache_key(INGEST_VERSION, source_hash(source, spec))
            outputs = [layout.scan_image(scan_id)]
            if cache.is_fresh(scan_id, key, outputs) and scan_id in previous.index:
                row = previous.loc[scan_id].to_dict()
                if row.get("status") == "ok":
                    rows.append({"scan": scan_id, **row})
                    continue
            prepared = prepare_scan(spec, source)
            atomic_write_image(prepared.image, layout.scan_image(scan_id))
            if prepared.fat is not None:
                atomic_write_image(prepared.fat, layout.scan_fat(scan_id))
            if prepared.expert is not None:
                atomic_write_image(prepared.expert, layout.scan_expert(scan_id))
            cache.record(scan_id, key)
            computed += 1
            size = prepared.image.GetSize()
            rows.append(
                {
                    "scan": scan_id,
                    "status": "ok",
                    "error": "",
                    "source": str(source.image),
                    "source_hash": key,
                    "shape_zyx": f"{size[2]}x{size[1]}x{size[0]}",
                    "spacing_mm": ",".join(f"{s:.3f}" for s in prepared.image.GetSpacing()),
                    "original_orientation": prepared.original.orientation(),
                    "region": "" if prepared.region is None else f"{prepared.region[0]}-{prepared.region[1]}",
                    "has_fat": prepared.fat is not None,
                    "has_expert": prepared.expert is not None,
                    "notes": "; ".join(prepared.notes),
                }
            )
        except ScanError as exc:
            context.log.error(f"scan {scan_id} excluded: {exc}")
            rows.append({"scan": scan_id, "status": "error", "error": str(exc), "source": str(source.image)})
    cache.forget_others(set(spec.scans))
    manifest = pd.DataFrame(rows).fillna({"error": "", "notes": ""})
    atomic_write_dataframe(manifest, layout.manifest)
    failed = manifest[manifest.status != "ok"]
    good = manifest[manifest.status == "ok"]
    metadata: dict[str, object] = {
        "n_scans": len(manifest),
        "n_ok": len(good),
        "n_failed": len(failed),
        "n_recomputed": computed,
        "input_fingerprint": folder_fingerprint(spec.folder),
        "modality": spec.modality,
        "sequence": spec.sequence,
        "classes": ", ".join(spec.class_names),
        "scans": dg.MetadataValue.md(
            md_table(manifest, ["scan", "status", "shape_zyx", "spacing_mm", "error"])
        ),
        "path": dg.MetadataValue.path(str(layout.dir("scans"))),
    }
    if len(good):
        first = good.iloc[0]["scan"]
        img = sitk.GetArrayFromImage(sitk.ReadImage(str(layout.scan_image(first))))
        metadata["preview"] = dg.MetadataValue.md(markdown_image(montage_png(img, None), f"{first}"))
    check = dg.AssetCheckResult(
        check_name="all_scans_readable",
        passed=len(failed) == 0,
        severity=dg.AssetCheckSeverity.ERROR,
        metadata={
            "failed": dg.MetadataValue.md(md_table(failed, ["scan", "error"])) if len(failed) else "none"
        },
        description="; ".join(failed.error.tolist())[:1000] or "all scans ingested",
    )
    version = cache_key(*sorted(f"{r.scan}:{r.source_hash}" for r in good.itertuples()))
    return dg.MaterializeResult(
        metadata=metadata, check_results=[check], data_version=dg.DataVersion(version)
    )


@dg.asset(
    partitions_def=datasets_partitions,
    group_name="ingest",
    kinds={"nifti"},
    code_version=INGEST_VERSION,
    automation_condition=EAGER,
    deps=[scans],
)
def reference_annotation(context: dg.AssetExecutionContext, storage: NnsamStorage) -> dg.MaterializeResult:
    """The one annotated axial slice, validated against the reference scan and put on its canonical crop."""
    spec = storage.dataset(context.partition_key)
    layout = dataset_layout(storage, context.partition_key)
    if spec.reference not in set(ok_scans(layout)):
        raise ScanError(
            spec.scans[spec.reference].image, "the reference scan failed ingest (see the scans asset)"
        )
    reference_original = read_image(spec.scans[spec.reference].image)
    annotation = validate_annotation(read_image(spec.annotation), reference_original, spec, spec.annotation)
    atomic_write_image(annotation.labels, layout.annotation)
    ann_hash = sha256_file(spec.annotation)
    meta = {
        "reference": spec.reference,
        "seed_slice": annotation.seed_slice,
        "n_classes": spec.n_classes,
        "annotation_sha256": ann_hash,
        "source": str(spec.annotation),
    }
    atomic_write_json(meta, layout.annotation_meta)
    ref = sitk.GetArrayFromImage(sitk.ReadImage(str(layout.scan_image(spec.reference))))
    labels = sitk.GetArrayFromImage(annotation.labels)
    z = annotation.seed_slice
    png = overlay_png(ref[z], labels[z])
    areas = {spec.class_names[c - 1]: int((labels[z] == c).sum()) for c in range(1, spec.n_classes + 1)}
    return dg.MaterializeResult(
        metadata={
            "reference": spec.reference,
            "seed_slice": z,
            "n_slices_in_region": int(ref.shape[0]),
            "class_areas_px": dg.MetadataValue.json(areas),
            "overlay": dg.MetadataValue.md(markdown_image(png, "annotated slice")),
            "path": dg.MetadataValue.path(str(layout.annotation)),
        },
        data_version=dg.DataVersion(cache_key(ann_hash, spec.reference, spec.regions.get(spec.reference))),
    )


@dg.asset(
    partitions_def=datasets_partitions,
    group_name="ingest",
    kinds={"pandas"},
    code_version="ranking-v1",
    automation_condition=EAGER,
    deps=[scans],
)
def reference_ranking(context: dg.AssetExecutionContext, storage: NnsamStorage) -> dg.MaterializeResult:
    """Advisory: which scan is most representative (medoid of image features at the top, middle, bottom).

    The reference code used DINOv2 features, whose weights cannot be had offline; these are weight-free.
    The user's annotation decides; this only suggests which scan to annotate for a new dataset.
    """
    layout = dataset_layout(storage, context.partition_key)
    spec = storage.dataset(context.partition_key)
    scan_ids = ok_scans(layout)
    volumes = {s: sitk.GetArrayFromImage(sitk.ReadImage(str(layout.scan_image(s)))) for s in scan_ids}
    ranking = rank_references(volumes, spec.modality)
    atomic_write_dataframe(ranking, layout.dir("reference_ranking") / "ranking.csv")
    best = str(ranking.iloc[0]["scan"]) if len(ranking) else ""
    return dg.MaterializeResult(
        metadata={
            "suggested_reference": best,
            "current_reference": spec.reference,
            "reference_rank": int(np.flatnonzero(ranking.scan.values == spec.reference)[0] + 1)
            if spec.reference in set(ranking.scan)
            else -1,
            "ranking": dg.MetadataValue.md(md_table(ranking, ["scan", "rank", "mean_distance"])),
        }
    )
