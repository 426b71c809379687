"""The propagation asset's ``propagation_confident`` check holds each backend to its own confidence scale."""

import dagster as dg
import pytest

from nnsam2_assets.definitions import all_assets
from nnsam2_assets.defs.resources import build_resources
from nnsam2_assets.metrics.qc import MIN_CONFIDENCE, confidence_threshold
from nnsam2_assets.pipeline import INGEST
from nnsam2_assets.testing.realdata import tum_dataset


@pytest.fixture(scope="module")
def propagated(tmp_path_factory):
    """The TUM pair (real Dixon scans, manual labels), one annotated middle slice, the registration backend."""
    root = tmp_path_factory.mktemp("tum")
    data, storage = root / "data", root / "storage"
    tum_dataset(data)
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("datasets", ["tum"])
        yield dg.materialize(
            all_assets(),
            selection=[*INGEST, "propagated_masks"],
            partition_key="tum",
            instance=instance,
            resources=build_resources(data, storage),
        )


def test_a_good_registration_propagation_passes_on_its_own_scale(propagated):
    """0.5, SAM2's threshold, had flagged every good registration-backend dataset (confidences about 0.3)."""
    meta = propagated.asset_materializations_for_node("propagated_masks")[0].metadata
    assert meta["backend"].value == "registration" and meta["mean_expert_dice"].value > 0.85
    mean = meta["mean_confidence"].value
    (check,) = [
        c for c in propagated.get_asset_check_evaluations() if c.check_name == "propagation_confident"
    ]
    assert check.metadata["threshold"].value == MIN_CONFIDENCE["registration"]
    assert check.passed and MIN_CONFIDENCE["registration"] <= mean < 0.5, mean


def test_the_check_and_the_per_scan_flag_share_one_threshold():
    assert confidence_threshold("registration") == MIN_CONFIDENCE["registration"]
    assert confidence_threshold("sam2") == confidence_threshold("unknown") == MIN_CONFIDENCE["sam2"]
    assert confidence_threshold("registration", {"sam2": 0.6, "registration": 0.2}) == 0.2
