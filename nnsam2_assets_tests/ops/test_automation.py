"""Declarative automation, evaluated offline with dg.evaluate_automation_conditions on a real instance.

The tester never launches runs, so every requested asset is materialized here by hand (as the automation
sensor's run would) before the next tick; each tick asserts one transition.
"""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import numpy as np
import pytest
import SimpleITK as sitk

from nnsam2_assets.definitions import all_assets
from nnsam2_assets.defs.automation import EAGER
from nnsam2_assets.defs.resources import build_resources
from nnsam2_assets_tests.ops import INGEST, write_tiny

PROPAGATED = dg.AssetKey("propagated_masks")
MODELS = [dg.AssetKey(f"nnunet_stage{i}") for i in (1, 2, 3)]
# propagated_masks and the eager per-dataset asset below it (will_be_requested: one run per partition).
# final_masks waits for the pooled stage-3 model (missing here), which is never requested automatically.
CHAIN = {PROPAGATED: {"tiny"}, dg.AssetKey("pseudo_labels"): {"tiny"}}


class Ticker:
    """Evaluates the automation conditions tick after tick, carrying the cursor."""

    def __init__(self, instance: dg.DagsterInstance, defs: dg.Definitions):
        self.instance, self.defs, self.cursor = instance, defs, None

    def tick(self, defs: dg.Definitions | None = None) -> dict[dg.AssetKey, set[str]]:
        result = dg.evaluate_automation_conditions(
            defs=defs or self.defs, instance=self.instance, cursor=self.cursor
        )
        self.cursor = result.cursor
        requested = {}
        for res in result.results:
            if res.true_subset.size:
                key = res.key
                requested[key] = (
                    set(result.get_requested_partitions(key)) if res.true_subset.is_partitioned else {None}
                )
        assert result.total_requested == sum(len(v) for v in requested.values())
        return requested


@pytest.fixture
def pipeline(tmp_path: Path):
    data, storage = tmp_path / "data", tmp_path / "storage"
    write_tiny(data, n_scans=2)
    assets = all_assets()
    resources = build_resources(data, storage)
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("datasets", ["tiny"])

        def materialize(selection, asset_list=None):
            result = dg.materialize(
                asset_list or assets,
                selection=selection,
                partition_key="tiny",
                instance=instance,
                resources=resources,
            )
            assert result.success
            return result

        ticker = Ticker(instance, dg.Definitions(assets=assets, resources=resources))
        assert ticker.tick() == {}  # first tick: nothing materialized, nothing to do
        materialize(INGEST)  # as new_data_sensor's run would
        yield ticker, materialize, data, storage, assets


def _data_version(instance, asset: str) -> str | None:
    record = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=["tiny"]), limit=1
    ).records[0]
    return record.asset_materialization.tags.get("dagster/data_version")


def _edit_annotation(data: Path) -> None:
    """Remove one boundary pixel of class 1 on the annotated slice: still valid, different content."""
    path = data / "tiny" / "annotation.nii.gz"
    img = sitk.ReadImage(str(path))
    arr = sitk.GetArrayFromImage(img)
    z, y, x = (int(v[0]) for v in np.nonzero(arr == 1))
    arr[z, y, x] = 0
    out = sitk.GetImageFromArray(arr)
    out.CopyInformation(img)
    sitk.WriteImage(out, str(path))


def _settle(ticker) -> None:
    """After ingest: the per-dataset eager chain is requested once, in one run, then considered handled."""
    assert ticker.tick() == CHAIN  # transition: fresh ingest -> the chain for that partition only
    assert ticker.tick() == {}  # handled: not requested again


def test_upstream_change_requests_downstream_and_unchanged_rerun_does_not_cascade(pipeline):
    ticker, materialize, *_ = pipeline
    _settle(ticker)
    materialize(["propagated_masks"])  # as the chain's run would (pseudo-labels are not run here)
    # transition: propagated_masks updated -> its eager downstream follows, it is not re-requested itself
    assert ticker.tick() == {k: v for k, v in CHAIN.items() if k != PROPAGATED}
    assert ticker.tick() == {}
    # (d) a rerun with the same inputs yields the same data versions -> nothing downstream is requested
    versions = {a: _data_version(ticker.instance, a) for a in ("scans", "reference_annotation")}
    materialize(["scans", "reference_annotation"])
    assert {a: _data_version(ticker.instance, a) for a in versions} == versions
    assert ticker.tick() == {}
    assert ticker.tick() == {}


def test_edited_annotation_requests_propagation_not_models(pipeline):
    ticker, materialize, data, storage, _ = pipeline
    _settle(ticker)
    before = _data_version(ticker.instance, "reference_annotation")
    _edit_annotation(data)
    materialize(["reference_annotation"])
    assert _data_version(ticker.instance, "reference_annotation") != before
    requested = ticker.tick()
    assert requested == CHAIN
    assert not set(MODELS) & set(requested)  # pooled models: on demand only
    assert ticker.tick() == {}


def test_rescanned_data_requests_everything_downstream_in_the_partition(pipeline):
    ticker, materialize, data, storage, _ = pipeline
    _settle(ticker)
    before = _data_version(ticker.instance, "scans")
    write_tiny(data, n_scans=2, seed=4)  # the same dataset rewritten with different scan content
    materialize(["scans"])
    assert _data_version(ticker.instance, "scans") != before
    # everything downstream of scans in the partition, in one run; never the pooled models
    requested = ticker.tick()
    assert requested == {
        dg.AssetKey("reference_annotation"): {"tiny"},
        dg.AssetKey("reference_ranking"): {"tiny"},
        **CHAIN,
    }
    assert ticker.tick() == {}


def test_code_version_bump_requests_the_asset(pipeline):
    ticker, materialize, _, _, assets = pipeline
    _settle(ticker)
    propagation = next(a for a in assets if isinstance(a, dg.AssetsDefinition) and PROPAGATED in a.keys)
    bumped = propagation.map_asset_specs(
        lambda spec: spec.replace_attributes(code_version="propagation-test")
    )
    assert bumped.code_versions_by_key[PROPAGATED] == "propagation-test"
    assert bumped.automation_conditions_by_key[PROPAGATED] == EAGER
    new_defs = dg.Definitions(
        assets=[bumped if a is propagation else a for a in assets], resources=ticker.defs.resources
    )
    # transition: the code version changed -> propagated_masks (and its eager chain, same run) requested
    assert ticker.tick(new_defs) == CHAIN
    assert ticker.tick(new_defs) == {}


def test_a_code_version_bump_requests_only_partitions_whose_inputs_exist(pipeline):
    """Dagster's code_version_changed() is true for every partition: ORed outside the policy's guards, a
    bump requested datasets that were never ingested (failing runs) and ones with a run under way."""
    ticker, materialize, _, _, assets = pipeline
    _settle(ticker)
    ticker.instance.add_dynamic_partitions("datasets", ["never_ingested"])
    assert ticker.tick() == {}
    propagation = next(a for a in assets if isinstance(a, dg.AssetsDefinition) and PROPAGATED in a.keys)
    bumped = propagation.map_asset_specs(lambda spec: spec.replace_attributes(code_version="propagation-2"))
    new_defs = dg.Definitions(
        assets=[bumped if a is propagation else a for a in assets], resources=ticker.defs.resources
    )
    assert ticker.tick(new_defs) == CHAIN
    assert ticker.tick(new_defs) == {}


def test_final_masks_follow_a_retrained_model_without_any_correction_reported():
    """corrections is external and reported only when a user drops one: a partition it was never reported
    for must not count as missing, or final masks would never follow a retrained stage-3 model."""
    from nnsam2_assets.definitions import defs as load_defs
    from nnsam2_assets.defs.automation import EAGER

    definitions = load_defs()
    final = dg.AssetKey("final_masks")
    holding = dg.Definitions(  # the same graph with the plain policy on final_masks
        assets=[
            a.map_asset_specs(
                lambda spec: (
                    spec.replace_attributes(automation_condition=EAGER) if spec.key == final else spec
                )
            )
            if isinstance(a, dg.AssetsDefinition) and final in a.keys
            else a
            for a in {id(a): a for a in definitions.assets}.values()  # merged defs list some twice
        ],
        resources=definitions.resources,
    )

    def after_retraining(defs: dg.Definitions) -> set:
        with dg.instance_for_test() as instance:
            instance.add_dynamic_partitions("datasets", ["ds"])
            parents = defs.resolve_asset_graph().get(final).parent_keys - {dg.AssetKey("corrections")}

            def report(key: dg.AssetKey, version: str) -> None:
                partition = None if key in MODELS else "ds"
                tags = {"dagster/data_version": version}
                instance.report_runless_asset_event(
                    dg.AssetMaterialization(key, partition=partition, tags=tags)
                )

            for key in parents:
                report(key, "a")
            instance.report_runless_asset_event(dg.AssetMaterialization(final, partition="ds"))
            selection = dg.AssetSelection.assets(final)
            first = dg.evaluate_automation_conditions(defs=defs, instance=instance, asset_selection=selection)
            report(dg.AssetKey("nnunet_stage3"), "b")  # a retrained model
            second = dg.evaluate_automation_conditions(
                defs=defs, instance=instance, asset_selection=selection, cursor=first.cursor
            )
            return set(second.get_requested_partitions(final))

    assert after_retraining(definitions) == {"ds"}
    assert after_retraining(holding) == set()  # the plain policy waits for ever on corrections
