"""The pool's classes: 4-class only when every dataset that brings scans is 4-class."""

from __future__ import annotations

from nnsam2_assets.refinement.pool import Pool


def _pool(n_classes: dict[str, int], scans: dict[str, list[str]]) -> Pool:
    return Pool(layouts=dict.fromkeys(n_classes), n_classes=n_classes, scans=scans)


def test_a_dataset_without_passing_scans_does_not_merge_the_pools_muscles():
    """A 2-class dataset whose every scan failed ingest trains nothing; it had made the pool 2-class, so the
    4-class datasets lost the models' erector spinae / multifidus split."""
    assert _pool({"four": 4, "two": 2}, {"four": ["s1", "s2"], "two": []}).classes == 4
    assert _pool({"four": 4, "two": 2}, {"four": ["s1"], "two": ["t1"]}).classes == 2
    assert _pool({"four": 4, "other": 4}, {"four": ["s1"], "other": ["t1"]}).classes == 4
    assert _pool({"four": 4}, {"four": []}).classes == 2  # nothing to train on: the side merge, as before


def test_a_dataset_bringing_no_labels_or_no_reference_leaves_the_pool_as_it_was(tmp_path):
    """A 2-class dataset whose annotation was refused, or never propagated, brings scans but no label: it had
    made the pool 2-class all the same. A dataset whose reference scan no longer passes ingest kept its
    annotation on a scan that is gone, and reading its held-out slab failed every dataset's models."""
    import types

    import pandas as pd

    from nnsam2_assets.core.layout import DatasetLayout
    from nnsam2_assets.core.storage import atomic_write_dataframe
    from nnsam2_assets.refinement.pool import build_pool

    def dataset(name: str, statuses: dict[str, str], labelled: bool) -> None:
        layout = DatasetLayout(tmp_path, name)
        manifest = pd.DataFrame({"scan": list(statuses), "status": list(statuses.values())})
        atomic_write_dataframe(manifest.assign(source_hash="x"), layout.manifest)
        for scan in statuses if labelled else ():
            layout.pseudo_label(scan).parent.mkdir(parents=True, exist_ok=True)
            layout.pseudo_label(scan).write_bytes(b"")

    dataset("four", {"r4": "ok", "s4": "ok"}, labelled=True)
    dataset("unlabelled", {"r2": "ok", "s2": "ok"}, labelled=False)
    dataset("refless", {"r3": "error", "s3": "ok"}, labelled=True)
    specs = {
        "four": types.SimpleNamespace(n_classes=4, modality="mri", reference="r4"),
        "unlabelled": types.SimpleNamespace(n_classes=2, modality="mri", reference="r2"),
        "refless": types.SimpleNamespace(n_classes=2, modality="ct", reference="r3"),
    }
    said = []
    pool = build_pool(tmp_path, list(specs), specs.__getitem__, log=said.append)
    assert pool.classes == 4 and pool.scans == {"four": ["r4", "s4"], "unlabelled": ["r2", "s2"]}
    assert said == ["dataset refless left out of the pool: its reference scan r3 did not pass ingest"]


def test_a_two_class_dataset_left_out_of_a_four_class_pool_trains_nothing_and_stops_no_one(
    tmp_path, monkeypatch
):
    """A 2-class dataset annotated on further slices but not yet propagated brings exact labels, not
    pseudo-labels: the pool is 4-class without it, and converting its labels to 4 classes had failed every
    dataset's stage training."""
    import numpy as np
    import SimpleITK as sitk

    from nnsam2_assets.core.layout import DatasetLayout
    from nnsam2_assets.refinement import stage_labels

    labels2 = np.zeros((6, 8, 8), np.uint8)
    labels2[2, 2:6, 1:3], labels2[2, 2:6, 5:7] = 1, 2
    path = tmp_path / "two_exact.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(labels2), str(path))
    pool = Pool(
        layouts={"four": DatasetLayout(tmp_path, "four"), "two": DatasetLayout(tmp_path, "two")},
        n_classes={"four": 4, "two": 2},
        scans={"four": ["s4"], "two": ["s2"]},
        labelled=frozenset({"four"}),
    )
    exact = {"four": [], "two": [("s2", [2], path)]}
    monkeypatch.setattr(stage_labels, "exact_labels", lambda layout: exact[layout.dataset])
    four_label = np.full((6, 8, 8), 3, np.uint8)
    assert pool.classes == 4 and pool.holds("four") and not pool.holds("two")
    out = stage_labels.exact_and_held_out({("four", "s4"): four_label}, pool)
    assert list(out) == [("four", "s4")]
    assert stage_labels.exact_lineage(pool) == {}
