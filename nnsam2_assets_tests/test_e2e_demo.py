"""End to end on the demo cohort (materialized once per session by the ``demo_cohort`` fixture)."""

import itertools
import json
import shutil
from pathlib import Path

import dagster as dg
import duckdb
import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
from scipy import ndimage

from nnsam2_assets.core.imaging import read_image
from nnsam2_assets.core.labels import class_names, ignore_label, mean_slice_dice, to_class_space
from nnsam2_assets.core.layout import (
    DatasetLayout,
    duckdb_path,
    model_root,
    stage_prediction,
    staged_label,
)
from nnsam2_assets.core.masks import clean_labels
from nnsam2_assets.core.storage import sha256_file
from nnsam2_assets.definitions import all_assets
from nnsam2_assets.defs.metadata import latest_metadata
from nnsam2_assets.defs.resources import build_resources
from nnsam2_assets.ingest.convention import DatasetSpec, load_dataset
from nnsam2_assets.ingest.scans import ok_scans
from nnsam2_assets.metrics.store import TABLES, query
from nnsam2_assets.outputs.report import report_paths
from nnsam2_assets.pipeline import OUTPUTS
from nnsam2_assets.propagation.boundary import band_pixels
from nnsam2_assets.refinement.corrections import read_record
from nnsam2_assets.refinement.final_masks import CONSENSUS_RULE, make_final_masks
from nnsam2_assets.refinement.finishing import finish_refined
from nnsam2_assets.refinement.holdout import decide, held_out_slab
from nnsam2_assets.refinement.muscle_split import (
    CAUDAL_SHARE_SLOPE_PER_MM,
    caudal_mm_per_slice,
    caudal_slope,
)
from nnsam2_assets.refinement.pool import build_pool
from nnsam2_assets.refinement.stage_labels import exact_labels, stage_labels

pytestmark = pytest.mark.slow


def _mean_slice_dice(pred: np.ndarray, truth: np.ndarray, k: int) -> float:
    """Mean slice Dice over the slices the ground truth covers."""
    covered = truth.reshape(truth.shape[0], -1).any(axis=1)
    return mean_slice_dice(pred[covered], truth[covered], k)


def test_demo_runs_every_stage(demo_cohort):
    assert demo_cohort.failed == {}, demo_cohort.failed
    for stage in ("stage1", "stage2", "stage3"):
        pointer = json.loads((model_root(demo_cohort.storage_root, stage) / "current.json").read_text())
        assert (
            model_root(demo_cohort.storage_root, stage) / pointer["version"] / "nnsam2_model.json"
        ).exists()
    for name in demo_cohort.datasets:
        layout = DatasetLayout(demo_cohort.storage_root, name)
        spec = load_dataset(demo_cohort.data_root, name)
        for scan in spec.scans:
            assert layout.final_mask(scan).exists(), (name, scan)
    print(f"demo cohort wall time: {demo_cohort.seconds:.0f} s; stages: {demo_cohort.timings}")


def test_final_masks_beat_the_copy_slice_floor(demo_cohort):
    """Final masks score >= the phantom's copy-slice floor + 0.10 (2-class mean slice Dice vs ground truth),
    and the floor itself is <= 0.75 so the phantom is not too easy."""
    floors, finals, propagated = [], [], []
    for name in demo_cohort.datasets:
        layout = DatasetLayout(demo_cohort.storage_root, name)
        spec = load_dataset(demo_cohort.data_root, name)
        seed = json.loads(layout.annotation_meta.read_text())["seed_slice"]
        n_ref = sitk.ReadImage(str(layout.scan_image(spec.reference))).GetSize()[2]
        for scan in spec.scans:
            truth = to_class_space(
                sitk.GetArrayFromImage(sitk.ReadImage(str(layout.scan_expert(scan)))), spec.n_classes, 2
            )
            final_arr = sitk.GetArrayFromImage(sitk.ReadImage(str(layout.final_mask_canonical(scan))))
            final = to_class_space(final_arr, spec.n_classes, 2)
            prop = to_class_space(
                sitk.GetArrayFromImage(sitk.ReadImage(str(layout.masks(scan)))), spec.n_classes, 2
            )
            level = round(seed * (truth.shape[0] - 1) / max(n_ref - 1, 1))
            copy = np.repeat(truth[level][None], truth.shape[0], axis=0)
            floors.append(_mean_slice_dice(copy, truth, 2))
            finals.append(_mean_slice_dice(final, truth, 2))
            propagated.append(_mean_slice_dice(prop, truth, 2))
    floor, final, prop = float(np.mean(floors)), float(np.mean(finals)), float(np.mean(propagated))
    print(f"copy-slice floor {floor:.3f}; propagation {prop:.3f}; final {final:.3f}")
    assert floor <= 0.75
    assert final >= floor + 0.10


def _refined_copy(demo_cohort, tmp_path, name: str, refined: bool = True) -> DatasetLayout:
    """One dataset's final masks made again in a copy of its storage with the held-out bar at 0 (always the
    refined masks; above 1 with ``refined=False``: never), reading the session's trained models and their
    cached predictions."""
    root = tmp_path / "storage"
    shutil.copytree(DatasetLayout(demo_cohort.storage_root, name).base, DatasetLayout(root, name).base)
    (root / "models").symlink_to(demo_cohort.storage_root / "models")
    layout = DatasetLayout(root, name)
    bar = 0.0 if refined else 1.01
    out = make_final_masks(
        load_dataset(demo_cohort.data_root, name), layout, ok_scans(layout), root, "cpu", min_heldout_dice=bar
    )
    assert out.decision.use_refined == refined
    return layout


def test_the_fragment_fraction_is_the_published_masks_source_only(demo_cohort, tmp_path):
    """The fragmented_mask flag asks the user to review a final mask; with the propagated masks published,
    the stage-3 prediction's fragments had raised it on masks that were never written."""
    refined = json.loads(_refined_copy(demo_cohort, tmp_path / "r", "demo-ct").final_summary.read_text())
    kept = json.loads(
        _refined_copy(demo_cohort, tmp_path / "p", "demo-ct", refined=False).final_summary.read_text()
    )
    assert set(refined["fragment_fraction"]) == set(kept["fragment_fraction"])
    assert all(np.isfinite(v) for v in refined["fragment_fraction"].values())
    assert all(np.isnan(v) for v in kept["fragment_fraction"].values())


def test_a_4_class_dataset_keeps_4_classes_in_a_mixed_pool(demo_cohort, tmp_path):
    """demo-dixon (4-class) is pooled with demo-ct (2-class): the pooled models are 2-class, yet demo-dixon's
    final masks and metrics are per muscle, and demo-ct's stay per side: in the session's run (whatever the
    held-out check chose) and with the refined masks forced."""
    pointer = json.loads((model_root(demo_cohort.storage_root, "stage3") / "current.json").read_text())
    assert pointer["n_classes"] == 2
    for name, k in (("demo-dixon", 4), ("demo-ct", 2)):
        refined = _refined_copy(demo_cohort, tmp_path / name, name)
        summary = json.loads(refined.final_summary.read_text())
        assert (summary["n_classes"], summary["model_classes"]) == (k, 2)
        assert summary["es_mf_interface"] == ("propagation" if k == 4 else "model")
        assert summary["es_mf_caudal_slope_per_mm"] == (CAUDAL_SHARE_SLOPE_PER_MM if k == 4 else None)
        metadata = latest_metadata(demo_cohort.instance, "final_masks", name)
        assert metadata["es_mf_caudal_slope_per_mm"] == (CAUDAL_SHARE_SLOPE_PER_MM if k == 4 else 0.0)
        for scan in ok_scans(refined):
            image = sitk.ReadImage(str(refined.final_mask_canonical(scan)))
            final = sitk.GetArrayFromImage(image)
            assert set(np.unique(final)) == set(range(k + 1)), (name, scan)
            if k == 4:  # the multifidus' share rises caudally at the least slope or more (fit tolerance)
                for side in ("right", "left"):
                    slope = caudal_slope(final, side, caudal_mm_per_slice(image))
                    assert slope > CAUDAL_SHARE_SLOPE_PER_MM - 0.003, (scan, side, slope)

        layout = DatasetLayout(demo_cohort.storage_root, name)
        summary = json.loads(layout.final_summary.read_text())
        assert (summary["n_classes"], summary["model_classes"]) == (k, 2)
        spec = load_dataset(demo_cohort.data_root, name)
        for scan in spec.scans:
            final = sitk.GetArrayFromImage(sitk.ReadImage(str(layout.final_mask_canonical(scan))))
            assert set(np.unique(final)) == set(range(k + 1)), (name, scan)
        rows = query(
            demo_cohort.duckdb,
            f"SELECT DISTINCT scheme, class_name FROM metrics.scan_metrics WHERE dataset = '{name}'",
        )
        per_scheme = rows.groupby("scheme").class_name.apply(set).to_dict()
        assert per_scheme[f"{k}-class"] == set(class_names(k)), per_scheme
    dixon = query(
        demo_cohort.duckdb,
        "SELECT class_name, avg(dice) AS dice FROM metrics.scan_metrics "
        "WHERE dataset = 'demo-dixon' AND scheme = '4-class' GROUP BY ALL",
    )
    assert (dixon.dice > 0.5).all(), dixon  # real per-muscle masks, not a relabelled side


def test_the_held_out_check_decides_without_expert_labels_and_the_final_masks_follow_it(demo_cohort):
    """No stage trained on the reference's annotated slab; the decision is the stage-3 model's side Dice on
    the annotated slice, finished as final masks are (recomputed here from the stored prediction, the scan
    and the annotation alone), and each
    dataset's final masks are the masks it chose."""
    for name in demo_cohort.datasets:
        layout = DatasetLayout(demo_cohort.storage_root, name)
        spec = load_dataset(demo_cohort.data_root, name)
        slab = held_out_slab(layout)
        for stage in ("stage1", "stage2", "stage3"):
            staged = staged_label(demo_cohort.storage_root, stage, name, spec.reference)
            assert staged.exists() or stage != "stage1", name  # stage 1 trains on every reference
            if staged.exists():  # the reference trains this stage: its slab is all "ignore"
                label = sitk.GetArrayFromImage(sitk.ReadImage(str(staged)))
                assert (label[slab.first : slab.last + 1] == ignore_label(2)).all(), (name, stage)
        summary = json.loads(layout.final_summary.read_text())
        decision = summary["refinement_decision"]
        assert summary["final_rule"] == (
            CONSENSUS_RULE if decision["source"] == "refined" else "propagated masks"
        )
        pointer = json.loads((model_root(demo_cohort.storage_root, "stage3") / "current.json").read_text())
        prediction = sitk.GetArrayFromImage(
            sitk.ReadImage(str(stage_prediction(Path(pointer["model_dir"]), name, spec.reference)))
        )
        finished = finish_refined(prediction, read_image(layout.scan_image(spec.reference)), spec.modality, 2)
        again = decide(finished, 2, layout, spec.n_classes)
        assert again.heldout_dice == pytest.approx(decision["heldout_dice"])
        assert decision["source"] == again.source
        for scan in spec.scans:
            final = sitk.GetArrayFromImage(sitk.ReadImage(str(layout.final_mask_canonical(scan))))
            propagated = sitk.GetArrayFromImage(sitk.ReadImage(str(layout.masks(scan))))
            if decision["source"] == "propagated":
                assert np.array_equal(final, clean_labels(propagated, spec.n_classes)), (name, scan)
            else:
                assert not np.array_equal(final, clean_labels(propagated, spec.n_classes)), (name, scan)
                # the consensus, its edges then placed on the image: every final voxel is on the side the
                # propagated mask puts it, or within the edge band of that side
                sides = to_class_space(final, spec.n_classes, 2)
                reach = to_class_space(propagated, spec.n_classes, 2)
                band = band_pixels(read_image(layout.scan_image(scan)).GetSpacing()[0])
                for z, side in itertools.product(range(final.shape[0]), (1, 2)):
                    near = ndimage.distance_transform_edt(reach[z] != side) <= band
                    assert near[sides[z] == side].all(), (name, scan, z, side)
        print(f"{name}: final masks {decision['source']}, held-out slice Dice {decision['heldout_dice']:.3f}")


def test_final_masks_reload_over_the_original_scans(demo_cohort):
    for name in demo_cohort.datasets:
        layout = DatasetLayout(demo_cohort.storage_root, name)
        spec = load_dataset(demo_cohort.data_root, name)
        for scan, source in spec.scans.items():
            original = read_image(source.image)
            mask = sitk.ReadImage(str(layout.final_mask(scan)))
            assert mask.GetSize() == original.GetSize()
            assert np.allclose(mask.GetSpacing(), original.GetSpacing())
            assert np.allclose(mask.GetOrigin(), original.GetOrigin())
            assert np.allclose(mask.GetDirection(), original.GetDirection())
            # the mask sits on the muscles of the original file, whatever its orientation: a flipped or shifted
            # mask would overlap the expert labels hardly at all (accuracy itself is asserted elsewhere)
            expert = sitk.GetArrayFromImage(read_image(source.expert)) > 0
            overlap = (sitk.GetArrayFromImage(mask) > 0) & expert
            assert overlap.sum() > 0.5 * (sitk.GetArrayFromImage(mask) > 0).sum()


def test_every_metrics_table_is_filled_and_documented_queries_run(demo_cohort):
    for table in TABLES:
        counts = query(demo_cohort.duckdb, f"SELECT dataset, count(*) AS n FROM metrics.{table} GROUP BY ALL")
        if table == "qc_flags":
            continue  # a clean cohort may legitimately raise no flag
        assert set(counts.dataset) == set(demo_cohort.datasets), table
    by_side = query(
        demo_cohort.duckdb,
        "SELECT dataset, side, avg(fat_ratio) AS fat_ratio FROM metrics.scan_metrics GROUP BY ALL ORDER BY ALL",
    )
    dixon = by_side[by_side.dataset == "demo-dixon"]
    assert dixon.fat_ratio.between(0.02, 0.5).all()
    flagged = query(demo_cohort.duckdb, "SELECT dataset, scan, flag, severity, detail FROM metrics.qc_flags")
    assert set(flagged.columns) == {"dataset", "scan", "flag", "severity", "detail"}
    ct = query(
        demo_cohort.duckdb, "SELECT avg(ct_mean_hu) AS hu FROM metrics.scan_metrics WHERE dataset = 'demo-ct'"
    )
    assert -30 < ct.hu.iloc[0] < 100
    agreement = query(demo_cohort.duckdb, "SELECT * FROM metrics.agreement WHERE measure = 'volume_ml'")
    assert set(agreement.tost_margin) == {0.05, 0.10}
    assert agreement.n.min() >= 3


def _counts(db) -> pd.DataFrame:
    return query(db, "SELECT dataset, count(*) AS n FROM metrics.scan_metrics GROUP BY ALL ORDER BY ALL")


def test_rematerializing_metrics_replaces_rows_exactly(demo_cohort):
    before = _counts(demo_cohort.duckdb)
    for name in (demo_cohort.datasets[0], demo_cohort.datasets[0], demo_cohort.datasets[1]):
        result = dg.materialize(
            all_assets(),
            selection=["scan_metrics"],
            partition_key=name,
            instance=demo_cohort.instance,
            resources=demo_cohort.resources,
        )
        assert result.success
    after = _counts(demo_cohort.duckdb)
    pd.testing.assert_frame_equal(before, after)
    per_scan = query(
        demo_cohort.duckdb,
        "SELECT dataset, scan, scheme, class_name, count(*) AS n FROM metrics.scan_metrics GROUP BY ALL HAVING n > 1",
    )
    assert per_scan.empty  # never a duplicate row
    assert set(OUTPUTS) >= {"scan_metrics", "agreement"}


def test_every_demo_scan_and_label_has_two_level_segments_that_add_up_and_match_the_phantom(demo_cohort):
    from nnsam2_assets.demo.phantom import generate_cohort
    from nnsam2_assets.ingest.scans import read_manifest
    from nnsam2_assets.metrics.quant import LEVEL_SEGMENTS

    levels = query(demo_cohort.duckdb, "SELECT * FROM metrics.level_metrics")
    labels = query(demo_cohort.duckdb, "SELECT * FROM metrics.scan_metrics")
    per_label = levels.groupby(["dataset", "scheme", "scan", "class_name"])
    assert (per_label["level"].nunique() == 2).all() and (per_label.size() == 2).all()
    assert set(levels.level) == set(LEVEL_SEGMENTS)
    assert len(per_label) == len(labels)  # every scan x label of scan_metrics has its segments
    summed = per_label.volume_ml.sum()
    whole = labels.set_index(["dataset", "scheme", "scan", "class_name"]).volume_ml
    np.testing.assert_allclose(
        summed.sort_index().to_numpy(), whole.loc[summed.index].sort_index().to_numpy()
    )
    # the experts' per-level volumes against the generator's truth, where the region is given exactly
    # (demo-dixon: regions.csv; demo-ct: its reference; the other demo-ct regions are found)
    seeds = {"demo-dixon": 0, "demo-ct": 1}
    checked = 0
    for dataset, seed in seeds.items():
        cohort = generate_cohort(4, seed)
        manifest = read_manifest(DatasetLayout(demo_cohort.storage_root, dataset))
        for i, phantom in enumerate(cohort.members):
            scan = f"subj{i:02d}"
            if manifest.loc[scan, "region_source"] == "found":
                continue
            lo, hi = phantom.region
            # the generator's disc slice of L4/L5 opens the upper segment (the convention of the split)
            upper = np.arange(lo, hi + 1) >= phantom.disc_slices["L4/L5"]
            truth = phantom.labels[lo : hi + 1]
            k = 4 if dataset == "demo-dixon" else 2
            truth = truth if k == 4 else to_class_space(truth, 4, 2)
            voxel_ml = float(np.prod(phantom.spacing)) / 1000.0
            rows = levels[
                (levels.dataset == dataset) & (levels.scan == scan) & (levels.scheme == f"{k}-class")
            ]
            for row in rows.itertuples():
                in_level = upper if row.level == LEVEL_SEGMENTS[0] else ~upper
                expected = float((truth[in_level] == row.label).sum()) * voxel_ml
                assert row.expert_volume_ml == pytest.approx(expected, rel=0.05), (dataset, scan, row.level)
                checked += 1
    assert checked == 4 * 4 * 2 + 2 * 2  # four Dixon scans x 4 labels x 2 levels, and the CT reference


def test_metrics_recompute_only_the_scan_whose_final_mask_changed(demo_cohort, tmp_path, monkeypatch):
    """A dataset's metrics on a copy of its storage: an unchanged rerun quantifies no scan and gives the same
    rows; an edited final mask is quantified again, alone, and only its rows change."""
    from nnsam2_assets.metrics import steps
    from nnsam2_assets.metrics.qc import QCConfig

    name = "demo-dixon"
    root = tmp_path / "storage"
    shutil.copytree(DatasetLayout(demo_cohort.storage_root, name).base, DatasetLayout(root, name).base)
    layout, spec = DatasetLayout(root, name), load_dataset(demo_cohort.data_root, name)
    quantified: list[str] = []
    real = steps._scan_rows

    def counting(spec, layout, scan, *args):
        quantified.append(scan)
        return real(spec, layout, scan, *args)

    monkeypatch.setattr(steps, "_scan_rows", counting)

    def labels() -> pd.DataFrame:
        rows = steps.dataset_metrics(spec, layout, QCConfig(), "test").tables["scan_metrics"]
        # QC flags compare a scan with the cohort, so an edited scan may change others' flags: not compared
        rows = rows.drop(columns=["computed_at", "qc_flags"])
        return rows.sort_values(["scan", "scheme", "class_name"], ignore_index=True)

    scans = ok_scans(layout)
    first = labels()  # the copied storage carries the session's cache: nothing to quantify
    assert quantified == []
    edited = scans[1]
    mask = read_image(layout.final_mask_canonical(edited))
    arr = sitk.GetArrayFromImage(mask)
    arr[arr == 1] = 0  # erase the right erector spinae
    out = sitk.GetImageFromArray(arr)
    out.CopyInformation(mask)
    sitk.WriteImage(out, str(layout.final_mask_canonical(edited)))
    second = labels()
    assert quantified == [edited]
    same = first.scan != edited
    pd.testing.assert_frame_equal(first[same].reset_index(drop=True), second[same].reset_index(drop=True))
    changed = second[(second.scan == edited) & (second.class_name == "right_es")]
    assert (changed.volume_ml == 0).all() and (
        first[(first.scan == edited) & (first.class_name == "right_es")].volume_ml > 0
    ).all()


def test_a_correction_flows_into_the_final_mask_the_metrics_and_the_next_training(demo_cohort, tmp_path):
    """A user corrects one scan's final mask (erases a slice, as in ITK-SNAP) and drops it into a materialized
    demo dataset. The new-data sensor records it and requests a run; only that scan's final mask and metric
    rows change, its metrics say corrected, and the next refinement run trains on the corrected slice."""
    name = "demo-dixon"
    data, storage = tmp_path / "data", tmp_path / "storage"
    shutil.copytree(demo_cohort.data_root / name, data / name, symlinks=True)
    shutil.copytree(demo_cohort.storage_root, storage, symlinks=True)
    resources = build_resources(data, storage, refinement=demo_cohort.resources["refinement"])
    layout = DatasetLayout(storage, name)

    def rows(table: str) -> pd.DataFrame:
        with duckdb.connect(str(duckdb_path(storage)), read_only=True) as con:
            df = con.execute(f"SELECT * FROM metrics.{table} WHERE dataset = ?", [name]).df()
        keys = [c for c in ("scan", "scheme", "class_name", "slice", "level") if c in df]
        return df.sort_values(keys, ignore_index=True)

    (tmp_path / "home").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp_path / "home")) as instance:
        instance.add_dynamic_partitions("datasets", [name])
        first = _sensor_tick(instance, resources["storage"], None)
        cursor = first.cursor  # the dataset as materialized: seen
        before = {t: rows(t) for t in ("scan_metrics", "slice_metrics")}
        scan = ok_scans(layout)[1]
        published = read_image(layout.final_mask(scan))
        arr = sitk.GetArrayFromImage(published)
        z_file = int(np.flatnonzero(arr.reshape(arr.shape[0], -1).any(1))[len(arr) // 3])
        arr[z_file] = 0  # the user erases one slice: a correction
        corrected = sitk.GetImageFromArray(arr)
        corrected.CopyInformation(published)
        (data / name / "corrections").mkdir()
        sitk.WriteImage(corrected, str(data / name / "corrections" / f"{scan}.nii.gz"))

        tick = _sensor_tick(instance, resources["storage"], cursor)
        (request,) = tick.run_requests
        record = read_record(layout, scan)
        assert record.base_mask_sha256 == sha256_file(layout.final_mask(scan))
        assert len(record.corrected_slices) == 1
        event = instance.get_latest_materialization_event(dg.AssetKey("corrections"))
        assert event.asset_materialization.partition == name
        result = dg.materialize(
            all_assets(),
            selection=request.asset_selection,
            partition_key=request.partition_key,
            instance=instance,
            resources=resources,
        )
        assert result.success

    np.testing.assert_array_equal(sitk.GetArrayFromImage(read_image(layout.final_mask(scan))), arr)
    for table, old in before.items():
        new = rows(table)
        others_old = old[old.scan != scan].drop(columns=["run_id", "computed_at"])
        others_new = new[new.scan != scan].drop(columns=["run_id", "computed_at"])
        assert set(others_old.columns) <= set(others_new.columns)
        pd.testing.assert_frame_equal(others_old, others_new[others_old.columns], check_dtype=False)
        assert (
            not old[old.scan == scan]
            .drop(columns=["run_id", "computed_at"])
            .equals(new[new.scan == scan][old.columns].drop(columns=["run_id", "computed_at"]))
        )
    scan_rows = rows("scan_metrics")
    mine = scan_rows[scan_rows.scan == scan]
    assert mine.corrected.all() and (mine.n_corrected_slices == 1).all()
    assert (mine.correction_volume_change_ml < 0).all() and mine.correction_dice.notna().all()
    assert not scan_rows[scan_rows.scan != scan].corrected.any()
    page = report_paths(layout)["html"].read_text()
    assert (
        "corrected by a user on 1 slice(s)" in page.split(f'data-scan="{scan}"', 1)[1].split("</section>")[0]
    )

    def spec(dataset: str) -> DatasetSpec:
        return load_dataset(data if dataset == name else demo_cohort.data_root, dataset)

    pool = build_pool(storage, demo_cohort.datasets, spec, log=print)
    _, labels = stage_labels("stage1", pool, storage, None)
    (z,) = record.corrected_slices
    assert not labels[(name, scan)][z].any()  # the erased slice is an exact (empty) label of the next run
    assert (scan, [z]) in [(s, slices) for s, slices, _ in exact_labels(layout)]


def _sensor_tick(instance, storage, cursor):
    from nnsam2_assets.defs.sensors import new_data_sensor

    return new_data_sensor(
        dg.build_sensor_context(instance=instance, resources={"storage": storage}, cursor=cursor)
    )


def test_a_scan_stored_in_another_axis_order_gets_its_final_mask_on_its_new_grid(demo_cohort, tmp_path):
    """The same scan re-exported in another axis order: the same crop, the same propagated mask, so the
    final masks' key was unchanged, and final_masks/<scan>.nii.gz stayed on the old file's grid."""
    from nnsam2_assets.core.imaging import same_grid
    from nnsam2_assets.testing.direct import STEPS, DirectRun

    name = "demo-ct"
    data, root = tmp_path / "data", tmp_path / "storage"
    shutil.copytree(demo_cohort.data_root / name, data / name)
    shutil.copytree(DatasetLayout(demo_cohort.storage_root, name).base, DatasetLayout(root, name).base)
    (root / "models").symlink_to(demo_cohort.storage_root / "models")
    spec = load_dataset(data, name)
    scan = next(s for s in sorted(spec.scans) if s != spec.reference)
    source = spec.scans[scan].image
    reordered = sitk.DICOMOrient(sitk.ReadImage(str(source)), "RAS")  # the same voxels in space
    sitk.WriteImage(reordered, str(source))

    run = DirectRun(data, root, [name])
    for step in ("scans", "propagated_masks"):
        STEPS[step](run, name)
    layout = DatasetLayout(root, name)
    make_final_masks(load_dataset(data, name), layout, ok_scans(layout), root, "cpu")
    assert same_grid(read_image(layout.final_mask(scan)), read_image(source))


def test_the_references_drawn_slices_are_its_final_mask_there(demo_cohort, tmp_path):
    """The refined masks published: the reference's annotated slices had come from the stage-3 prediction,
    not from what the user drew (a correction's slices are the user's; the drawn ones were not)."""
    from nnsam2_assets.ingest.annotation import annotated_slices, read_annotation_meta

    for name in ("demo-dixon", "demo-ct"):
        layout = _refined_copy(demo_cohort, tmp_path / name, name)
        reference = load_dataset(demo_cohort.data_root, name).reference
        slices = list(annotated_slices(read_annotation_meta(layout)))
        drawn = sitk.GetArrayFromImage(sitk.ReadImage(str(layout.annotation)))[slices]
        final = sitk.GetArrayFromImage(sitk.ReadImage(str(layout.final_mask_canonical(reference))))[slices]
        np.testing.assert_array_equal(final, drawn)
