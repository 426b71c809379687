"""Propagation in worker processes: the same masks and confidence tables as one process, bit for bit."""

import pandas as pd
import pytest

from nnsam2_assets.core.storage import sha256_file
from nnsam2_assets.propagation.settings import PropagationConfig
from nnsam2_assets.testing.cohorts import write_tiny_dataset
from nnsam2_assets.testing.direct import STEPS, DirectRun


def _propagated(tmp_path, data, workers: int):
    run = DirectRun(
        data, tmp_path / f"storage-{workers}", ["par"], propagation=PropagationConfig(workers=workers)
    )
    for asset in ("scans", "reference_annotation"):
        STEPS[asset](run, "par")
    return run.layout("par"), STEPS["propagated_masks"](run, "par")


def test_two_workers_write_the_masks_one_worker_writes(tmp_path):
    data = tmp_path / "data"
    write_tiny_dataset(data, "par", 4, seed=21)
    one_layout, one = _propagated(tmp_path, data, 1)
    two_layout, two = _propagated(tmp_path, data, 2)
    assert (one.workers, two.workers) == (1, 2) and one.computed == two.computed == 4
    scans = list(one.summary.scan)
    assert scans == list(two.summary.scan)
    for scan in scans:
        assert sha256_file(one_layout.masks(scan)) == sha256_file(two_layout.masks(scan)), scan
        pd.testing.assert_frame_equal(
            pd.read_parquet(one_layout.confidence(scan)), pd.read_parquet(two_layout.confidence(scan))
        )
    pd.testing.assert_frame_equal(
        one.summary.drop(columns="mask_sha256"), two.summary.drop(columns="mask_sha256")
    )

    # a rerun with nothing changed propagates nothing and starts no worker
    _, again = _propagated(tmp_path, data, 2)
    assert (again.computed, again.workers) == (0, 1)


def test_the_data_version_follows_the_confidence_tables_as_well_as_the_masks():
    """Pseudo-label selection ranks slices by confidence: new confidences on the same masks had left the
    data version as it was, so the selection downstream was not run again."""
    from nnsam2_assets.propagation.steps import PropagationReport

    def report(confidence: str) -> PropagationReport:
        return PropagationReport(
            pd.DataFrame({"mask_sha256": ["m1"], "confidence_sha256": [confidence]}), 1, 0
        )

    assert report("c1").data_version == report("c1").data_version != report("c2").data_version
    cached_before = PropagationReport(pd.DataFrame({"mask_sha256": ["m1"]}), 0, 0)  # no confidence digest
    assert cached_before.data_version != "empty"


@pytest.mark.parametrize("workers", [1, 2])
def test_a_scan_whose_propagation_fails_is_left_out_alone_with_nothing_stale_behind(tmp_path, workers):
    """One scan's error (a SimpleITK RuntimeError, a CUDA out-of-memory, an unreadable file) failed the
    dataset's whole step, and with two workers threw away every other scan's finished result. Its earlier
    mask, pseudo-label, final mask and rows must not stand for it downstream either."""
    from nnsam2_assets.propagation import steps

    data = tmp_path / "data"
    write_tiny_dataset(data, "par", 3, seed=21)
    run = DirectRun(data, tmp_path / "storage", ["par"], propagation=PropagationConfig(workers=workers))
    for asset in ("scans", "reference_annotation", "propagated_masks", "pseudo_labels"):
        STEPS[asset](run, "par")
    layout = run.layout("par")
    earlier = {path for path in layout.propagation_outputs("subj02") if path.exists()}
    assert {layout.masks("subj02"), layout.pseudo_label("subj02")} <= earlier

    layout.scan_image("subj02").write_bytes(b"damaged")  # unreadable in a worker and in this process
    # another backend identity: every scan is propagated again
    report = steps.propagate_masks(run.spec("par"), layout, run.propagation.build, "another backend", workers)
    assert list(report.failed) == ["subj02"] and "subj02" in report.failed["subj02"]
    assert sorted(report.summary.scan) == ["subj00", "subj01"] and report.computed == 2
    assert not any(path.exists() for path in layout.propagation_outputs("subj02"))
    assert steps.propagated_scans(layout) == ["subj00", "subj01"]
    assert sorted(STEPS["pseudo_labels"](run, "par").per_scan.scan) == ["subj00", "subj01"]
