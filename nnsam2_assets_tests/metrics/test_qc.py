import pandas as pd

from nnsam2_assets.metrics.qc import QCConfig, qc_flags, robust_z


def _labels(volumes: dict[str, tuple[float, float]], hu: float | None = None) -> pd.DataFrame:
    rows = []
    for scan, (right, left) in volumes.items():
        for label, side, vol in (("right_lpm", "right", right), ("left_lpm", "left", left)):
            rows.append(
                {"dataset": "d", "scan": scan, "label": label, "side": side, "volume_ml": vol, "hu_mean": hu}
            )
    return pd.DataFrame(rows)


def _scans(names, conf=0.9, dice=0.95, frag=0.0) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "dataset": "d",
            "scan": list(names),
            "mean_confidence": conf,
            "stage_dice_min": dice,
            "fragment_fraction": frag,
        }
    )


def test_clean_cohort_has_no_flags():
    vols = {f"s{i}": (100.0 + i, 98.0 + i) for i in range(6)}
    assert qc_flags(_scans(vols), _labels(vols, hu=40.0)).empty


def test_a_clean_dataset_still_creates_the_flag_table_that_later_flags_fill(tmp_path):
    """The documented queries read metrics.qc_flags; a cohort whose every scan is clean must not leave them
    failing on a missing table, and the columns it creates must take a later dataset's flags."""
    from nnsam2_assets.metrics.store import query, replace_dataset

    vols = {f"s{i}": (100.0 + i, 98.0 + i) for i in range(6)}
    clean = qc_flags(_scans(vols), _labels(vols, hu=40.0)).assign(run_id="r1")
    db = tmp_path / "m.duckdb"
    replace_dataset(db, "d", {"qc_flags": clean})
    columns = query(db, "SELECT * FROM metrics.qc_flags")
    assert columns.empty and list(columns.columns) == [
        "dataset",
        "scan",
        "flag",
        "severity",
        "detail",
        "run_id",
    ]
    flagged = qc_flags(_scans(["s0"], conf=0.01), _labels({"s0": (100.0, 98.0)})).assign(
        dataset="e", run_id="r2"
    )
    replace_dataset(db, "e", {"qc_flags": flagged})
    rows = query(db, "SELECT dataset, flag, run_id FROM metrics.qc_flags")
    assert rows.values.tolist() == [["e", "low_confidence", "r2"]]


def test_each_flag_fires_with_its_reason_and_severity():
    vols = {f"s{i}": (100.0 + i, 99.0) for i in range(6)}
    vols["s_asym"] = (100.0, 40.0)
    vols["s_big"] = (400.0, 390.0)
    vols["s_empty"] = (0.0, 100.0)
    scans = _scans(vols)
    scans.loc[scans.scan == "s0", "mean_confidence"] = 0.2
    scans.loc[scans.scan == "s1", "stage_dice_min"] = 0.7
    scans.loc[scans.scan == "s2", "fragment_fraction"] = 0.3
    labels = _labels(vols, hu=40.0)
    labels.loc[labels.scan == "s3", "hu_mean"] = 180.0
    flags = qc_flags(scans, labels, QCConfig())
    got = {(r.scan, r.flag, r.severity) for r in flags.itertuples()}
    assert ("s0", "low_confidence", "WARN") in got
    assert ("s1", "stage_disagreement", "WARN") in got
    assert ("s2", "fragmented_mask", "WARN") in got
    assert ("s3", "implausible_hu", "WARN") in got
    assert ("s_asym", "asymmetry", "WARN") in got
    assert ("s_big", "volume_ml_outlier", "WARN") in got
    assert ("s_empty", "empty_mask", "ERROR") in got
    detail = flags[flags.flag == "asymmetry"].detail.iloc[0]
    assert (
        detail == "the right side is 2.50 times the left side's volume (right 100.0 ml, left 40.0 ml; > 1.5)"
    )


def test_the_asymmetry_flag_names_the_larger_side():
    """It had said "left/right volume ratio 2.50" whichever side was larger: 2.50 with the right side the
    larger one sent the reviewer to the wrong side."""
    vols = {f"s{i}": (100.0 + i, 99.0) for i in range(6)} | {"s_left": (40.0, 100.0)}
    flags = qc_flags(_scans(vols), _labels(vols, hu=40.0), QCConfig())
    (detail,) = flags[flags.flag == "asymmetry"].detail
    assert detail.startswith("the left side is 2.50 times the right side's volume (right 40.0 ml, left 100.0")


def test_fat_asymmetry_compares_volume_weighted_side_fat_ratios():
    vols = {"s_sym": (100.0, 100.0), "s_asym": (100.0, 100.0)}
    labels = _labels(vols)
    labels["fat_ratio"] = 0.10
    labels.loc[(labels.scan == "s_asym") & (labels.side == "left"), "fat_ratio"] = 0.20
    flags = qc_flags(_scans(vols), labels, QCConfig())
    assert list(flags.flag) == ["fat_asymmetry"] and list(flags.scan) == ["s_asym"]
    assert "right 0.100 vs left 0.200 (|difference| 0.100 > 0.05)" in flags.detail.iloc[0]
    # 4-class rows: a small fatty multifidus beside a large lean erector spinae is weighted by volume
    four = pd.DataFrame(
        [
            {
                "dataset": "d",
                "scan": "s",
                "label": "right_es",
                "side": "right",
                "volume_ml": 90.0,
                "fat_ratio": 0.1,
            },
            {
                "dataset": "d",
                "scan": "s",
                "label": "right_mf",
                "side": "right",
                "volume_ml": 10.0,
                "fat_ratio": 0.1,
            },
            {
                "dataset": "d",
                "scan": "s",
                "label": "left_es",
                "side": "left",
                "volume_ml": 90.0,
                "fat_ratio": 0.1,
            },
            {
                "dataset": "d",
                "scan": "s",
                "label": "left_mf",
                "side": "left",
                "volume_ml": 10.0,
                "fat_ratio": 0.5,
            },
        ]
    )
    assert qc_flags(_scans(["s"]), four, QCConfig()).empty  # sides 0.10 vs 0.14: within 0.05
    four.loc[3, "fat_ratio"] = 0.7  # left 0.16
    assert list(qc_flags(_scans(["s"]), four, QCConfig()).flag) == ["fat_asymmetry"]


def test_robust_z_handles_zero_spread():
    assert (robust_z(pd.Series([1.0, 1.0, 1.0])) == 0).all()
    z = robust_z(pd.Series([1.0, 2.0, 3.0, 4.0, 100.0]))
    assert z.iloc[-1] > 3.5 > abs(z.iloc[0])


def test_swapped_sides_raise_an_error_flag_and_correct_sides_none():
    vols = {"ok": (100.0, 99.0), "swapped": (100.0, 99.0)}
    scans = _scans(vols).assign(laterality_gap=[40.0, -38.0])
    flags = qc_flags(scans, _labels(vols, hu=40.0))
    assert [(r.scan, r.flag, r.severity) for r in flags.itertuples()] == [
        ("swapped", "laterality_swapped", "ERROR")
    ]
    assert "38 voxels to the patient's left" in flags.detail.iloc[0]


def test_registration_confidence_flag_is_quiet_on_good_masks_and_fires_on_a_target_without_anatomy():
    """The per-backend threshold on real propagations: phantoms propagated from their reference, and a
    target of smooth noise (no anatomy at all)."""
    import numpy as np
    import SimpleITK as sitk
    from scipy import ndimage

    from nnsam2_assets.core.labels import mean_dice, merge_sides
    from nnsam2_assets.demo.phantom import generate_cohort
    from nnsam2_assets.metrics.qc import GOOD_DICE, mean_confidence
    from nnsam2_assets.propagation.backends import build_propagator

    propagator = build_propagator("registration")
    cohort = generate_cohort(3, seed=100, shape_yx=(96, 96), spacing=(2.0, 2.0, 4.0))
    ref = cohort.members[cohort.typical_index]
    z = (ref.region[0] + ref.region[1]) // 2
    seed_labels = np.zeros_like(ref.labels)
    seed_labels[z] = ref.labels[z]
    annotation = sitk.GetImageFromArray(seed_labels)
    annotation.CopyInformation(ref.images["water"])
    rows, dice = [], {}
    targets = {f"p{i}": m.images["water"] for i, m in enumerate(cohort.members) if i != cohort.typical_index}
    noise = ndimage.gaussian_filter(np.random.default_rng(0).normal(size=ref.labels.shape), (0, 6, 6))
    blank = sitk.GetImageFromArray((500 + 300 * noise).astype(np.float32))
    blank.CopyInformation(ref.images["water"])
    targets["no_anatomy"] = blank
    for name, target in targets.items():
        res = propagator.propagate(ref.images["water"], annotation, z, target, "mri")
        if name != "no_anatomy":
            member = cohort.members[int(name[1:])]
            dice[name] = mean_dice(merge_sides(res.masks), merge_sides(member.labels), 2)
        rows.append({"dataset": "d", "scan": name, "mean_confidence": mean_confidence(res.confidence)})
    scans = pd.DataFrame(rows).assign(stage_dice_min=0.95, fragment_fraction=0.0, backend="registration")
    flagged = set(qc_flags(scans, _labels({r["scan"]: (100.0, 99.0) for r in rows}, hu=40.0)).scan)
    good = {name for name, d in dice.items() if d >= GOOD_DICE}
    assert good, dice  # the check is about good masks: there must be some
    assert not good & flagged, (dice, scans)
    assert "no_anatomy" in flagged


def test_the_metrics_data_version_follows_the_rows_written_not_the_run_that_wrote_them():
    """``scan_metrics`` had no data version of its own: a rerun with other QC thresholds, flagging other
    scans, was no change for the agreement and the report, which then disagreed with the database."""
    from nnsam2_assets.metrics.steps import DatasetMetrics

    def written(run_id: str, flags: list[str]) -> DatasetMetrics:
        lineage = {"run_id": run_id, "computed_at": pd.Timestamp.now(tz="UTC")}
        labels = pd.DataFrame({"scan": ["a", "b"], "volume_ml": [101.5, 98.25]}).assign(**lineage)
        qc = pd.DataFrame({"scan": ["a"] * len(flags), "flag": flags}).assign(**lineage)
        return DatasetMetrics({"scan_metrics": labels, "qc_flags": qc}, 2, 2)

    first = written("run-1", ["asymmetry"])
    assert written("run-2", ["asymmetry"]).data_version == first.data_version
    assert written("run-3", []).data_version != first.data_version
