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
