"""Definitions load, the asset graph is frozen in a snapshot (lineage, partitions, pools, automation)."""

import json
import subprocess
import sys
from pathlib import Path

import dagster as dg

from nnsam2_assets.definitions import defs

REPO = Path(__file__).resolve().parents[2]


def _graph_snapshot() -> dict:
    d = defs()
    graph = d.resolve_asset_graph()
    out = {}
    for key in sorted(graph.get_all_asset_keys(), key=lambda k: k.to_user_string()):
        node = graph.get(key)
        spec = node.to_asset_spec() if hasattr(node, "to_asset_spec") else None
        out[key.to_user_string()] = {
            "deps": sorted(p.to_user_string() for p in node.parent_keys),
            "group": node.group_name,
            "partitioned": node.partitions_def is not None,
            "code_version": node.code_version,
            "pools": sorted(node.pools or []),
            "kinds": sorted(spec.kinds) if spec else [],
            "automation": None
            if node.automation_condition is None
            else node.automation_condition.get_label() or type(node.automation_condition).__name__,
            "checks": sorted(c.name for c in graph.get_check_keys_for_assets({key})),
        }
    return out


def test_definitions_load_and_jobs_resolve():
    d = defs()
    assert d.resolve_job_def("dataset_job") is not None
    assert d.resolve_job_def("refinement_job") is not None
    assert {s.name for s in d.sensors} == {"new_data_sensor", "nnsam2_automation_sensor"}
    assert {s.name for s in d.schedules} == {"nightly_sweep_schedule", "weekly_refinement_schedule"}


def test_asset_graph_snapshot(snapshot):
    assert _graph_snapshot() == snapshot


def test_the_final_masks_code_version_follows_their_own_rules_and_the_refinement_code():
    # a new final-mask rule must reach Dagster's code version, or automation never reruns the final masks
    from nnsam2_assets.refinement import stages
    from nnsam2_assets.refinement.final_masks import FINAL_MASKS_VERSION

    version = defs().resolve_asset_graph().get(dg.AssetKey("final_masks")).code_version
    assert FINAL_MASKS_VERSION in version and stages.VERSION in version


def test_gpu_steps_are_pooled_and_request_a_gpu():
    graph = defs().resolve_asset_graph()
    gpu = {"propagated_masks", "nnunet_stage1", "nnunet_stage2", "nnunet_stage3", "final_masks"}
    for name in gpu:
        node = graph.get(dg.AssetKey(name))
        assert node.pools == {"gpu"}, name
    for name in ("scan_metrics", "agreement"):
        assert graph.get(dg.AssetKey(name)).pools == {"duckdb"}
    from nnsam2_assets.defs.propagation import propagated_masks
    from nnsam2_assets.defs.refinement import nnunet_stage1

    for asset in (propagated_masks, nnunet_stage1):
        k8s = asset.op.tags["dagster-k8s/config"]
        k8s = json.loads(k8s) if isinstance(k8s, str) else k8s
        assert k8s["container_config"]["resources"]["limits"]["nvidia.com/gpu"] == "1"


def test_model_assets_train_on_demand_not_eagerly():
    graph = defs().resolve_asset_graph()
    for stage in ("nnunet_stage1", "nnunet_stage2", "nnunet_stage3"):
        assert graph.get(dg.AssetKey(stage)).automation_condition is None
    assert graph.get(dg.AssetKey("scans")).automation_condition is None  # new data: the sensor's job only
    for name in ("propagated_masks", "pseudo_labels", "final_masks", "scan_metrics"):
        assert graph.get(dg.AssetKey(name)).automation_condition is not None


def test_dg_check_defs_and_workspace_location_match():
    import tomllib

    import yaml

    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    workspace = yaml.safe_load((REPO / "workspace.yaml").read_text())
    loc = workspace["load_from"][0]["python_module"]["location_name"]
    assert loc == pyproject["tool"]["dg"]["project"]["code_location_name"] == "nnsam2"
    res = subprocess.run(
        [sys.executable, "-m", "dagster", "definitions", "validate", "-w", "workspace.yaml"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stdout + res.stderr
