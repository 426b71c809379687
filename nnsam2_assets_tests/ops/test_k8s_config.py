"""The Kubernetes engine, checked as configuration (no cluster here): ``NNSAM2_EXECUTOR=k8s`` puts every job on
dagster-k8s's pod-per-step executor, and dagster-k8s's own tag parser turns each GPU step's tags into a GPU
request. The definitions load in a fresh interpreter: the jobs' engines are chosen when their modules load."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from nnsam2_assets.executors import EXECUTOR_ENV
from nnsam2_assets_tests.ops import REPO

CHILD = """
import json
import dagster as dg
from dagster_k8s.job import get_user_defined_k8s_config
from nnsam2_assets.definitions import all_assets, defs

jobs = {job.name: job.executor_def.name for job in defs().resolve_all_job_defs()}
for job in defs().resolve_all_job_defs():
    dg.validate_run_config(job, {})  # the executor needs no run config of its own: the launcher supplies it
steps = {}
for asset in all_assets():
    if isinstance(asset, dg.AssetsDefinition) and asset.is_executable and asset.keys:
        resources = get_user_defined_k8s_config(asset.op.tags).container_config.get("resources", {})
        steps[asset.node_def.name] = [asset.op.pool, resources.get("limits", {}).get("nvidia.com/gpu")]
print(json.dumps({"jobs": jobs, "steps": steps}))
"""


def test_k8s_executor_runs_every_job_and_gpu_steps_request_a_gpu(tmp_path):
    env = {**os.environ, EXECUTOR_ENV: "k8s", "PYTHONPATH": str(REPO), "DAGSTER_HOME": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-c", CHILD], env=env, cwd=tmp_path, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "dataset_job" in found["jobs"] and set(found["jobs"].values()) == {"k8s"}, found["jobs"]
    steps = found["steps"]
    gpu_steps = {name for name, (pool, _) in steps.items() if pool == "gpu"}
    assert {"propagated_masks", "nnunet_stage1", "final_masks"} <= gpu_steps
    for name, (pool, gpus) in steps.items():
        assert gpus == ("1" if pool == "gpu" else None), (name, pool, gpus)
