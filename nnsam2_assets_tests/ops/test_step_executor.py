"""The code location's step executor (forkserver, heavy modules preloaded): a step that kills its own process
fails alone; the run's other steps still run, in processes forked from the preloaded server.

The job runs in a fresh interpreter: a process has one fork server, started by the first executor that
asks, so in the test process another test's run could already own it with other preloads."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import dagster as dg

from nnsam2_assets.definitions import defs
from nnsam2_assets.defs.resources import NNUNET_EPOCHS_ENV
from nnsam2_assets.executors import (
    CHAIN_PRELOADED_MODULES,
    CHAIN_STEP_EXECUTOR,
    EXECUTOR_ENV,
    PRELOADED_MODULES,
    STEP_EXECUTOR,
    job_to_execute,
    start_step_server_early,
    step_server_preload,
)
from nnsam2_assets.refinement.nnunet._common import HEAVY_MODULES


@dg.asset
def crashes() -> None:
    os._exit(3)  # what a segfaulting library or an out-of-memory kill looks like to the executor


@dg.asset
def survives() -> dg.MaterializeResult:
    # forked from the server: the preloaded modules are there before this step imported anything
    preloaded = [m for m in PRELOADED_MODULES if m in sys.modules]
    return dg.MaterializeResult(metadata={"pid": os.getpid(), "preloaded": len(preloaded)})


def _asset_job(name: str, assets: list, executor: dg.ExecutorDefinition) -> dg.JobDefinition:
    jobs = [dg.define_asset_job(name, executor_def=executor)]
    return dg.Definitions(assets=assets, jobs=jobs).resolve_job_def(name)


def crash_job() -> dg.JobDefinition:
    return _asset_job("crash_job", [crashes, survives], STEP_EXECUTOR)


def run_crash_job(home: str, out: str) -> None:
    """The child's side: run the job, write what happened as JSON."""
    with (
        dg.instance_for_test(temp_dir=home) as instance,
        dg.execute_job(dg.reconstructable(crash_job), instance=instance, raise_on_error=False) as result,
    ):
        events = result.all_events
        (materialization,) = result.asset_materializations_for_node("survives")
        Path(out).write_text(
            json.dumps(
                {
                    "success": result.success,
                    "failed": sorted(
                        e.step_key for e in events if e.event_type == dg.DagsterEventType.STEP_FAILURE
                    ),
                    "succeeded": sorted(e.step_key for e in events if e.is_step_success),
                    "orchestrator": os.getpid(),
                    "step_pid": materialization.metadata["pid"].value,
                    "preloaded": materialization.metadata["preloaded"].value,
                }
            )
        )


@dg.asset
def reports_its_parent() -> dg.MaterializeResult:
    preloaded = [m for m in CHAIN_PRELOADED_MODULES if m in sys.modules]
    return dg.MaterializeResult(metadata={"parent": os.getppid(), "preloaded": len(preloaded)})


def parent_job() -> dg.JobDefinition:
    return _asset_job("parent_job", [reports_its_parent], CHAIN_STEP_EXECUTOR)


def _fork_servers(pid: int) -> list[int]:
    """The live multiprocessing fork servers started by ``pid`` (Linux /proc)."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            parent = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            command = (proc / "cmdline").read_bytes()
        except OSError:  # the process ended while we looked
            continue
        if parent == pid and b"multiprocessing.forkserver" in command:
            found.append(int(proc.name))
    return found


def run_with_early_server(home: str, out: str) -> None:
    """The child's side: start the fork server as ``dagster job execute -j dataset_job`` would, then run a job
    on the chain's executor and record which process its step was forked from."""
    not_a_run = start_step_server_early(["pytest", "-n", "2"])
    none_yet = _fork_servers(os.getpid())
    started = start_step_server_early(["dagster", "job", "execute", "-m", "defs", "--job", "dataset_job"])
    (server,) = _fork_servers(os.getpid())
    with (
        dg.instance_for_test(temp_dir=home) as instance,
        dg.execute_job(dg.reconstructable(parent_job), instance=instance) as result,
    ):
        (materialization,) = result.asset_materializations_for_node("reports_its_parent")
        metadata = {k: v.value for k, v in materialization.metadata.items()}
    record = {"not_a_run": not_a_run, "none_yet": none_yet, "started": started, "server": server}
    Path(out).write_text(json.dumps({**record, **metadata}))


def _run_in_fresh_interpreter(child: str, tmp_path: Path) -> dict:
    """Run this module's ``child(home, out)`` in a new Python process and return the JSON it wrote."""
    out = tmp_path / "result.json"
    code = f"from {__name__} import {child}; {child}({str(tmp_path)!r}, {str(out)!r})"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_a_launched_job_forks_its_steps_from_the_server_started_while_the_code_loaded(tmp_path):
    result = _run_in_fresh_interpreter("run_with_early_server", tmp_path)
    assert (result["not_a_run"], result["none_yet"], result["started"]) == (False, [], True)
    # the executor found the early server running and forked the step from it, with its imports in place
    assert result["parent"] == result["server"]
    assert result["preloaded"] == len(CHAIN_PRELOADED_MODULES)


LAUNCHER = """
import sys
sys.argv = ["dagster", "job", "execute", "-m", "nnsam2_assets.definitions", "-j", "dataset_job"]
import gc
import nnsam2_assets.definitions as code_location
frozen = gc.get_freeze_count()
code_location.defs()  # imports DuckDB, after the freeze, as the launcher's load does
import duckdb
from nnsam2_assets.executors import freeze_imported_objects
print(frozen, freeze_imported_objects(), duckdb.connect().execute("select 42").fetchone()[0])
"""


def test_a_launcher_freezes_its_imports_and_still_exits_without_leak_reports(tmp_path):
    env = {**os.environ, EXECUTOR_ENV: "multiprocess", "DAGSTER_HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", LAUNCHER], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    frozen, refrozen, answer = proc.stdout.split()
    assert int(frozen) > 10_000 and answer == "42"
    # once DuckDB is loaded nothing more is frozen: its objects must stay collectable, or its bindings
    # report them as leaked when the interpreter ends
    assert refrozen == "False"
    assert "leaked" not in proc.stderr, proc.stderr[-3000:]


def test_only_a_process_launched_to_execute_a_job_starts_a_server_early(monkeypatch):
    assert job_to_execute(["dagster", "job", "execute", "-m", "defs", "-j", "dataset_job"]) == "dataset_job"
    assert job_to_execute(["dagster", "job", "execute", "--job=refinement_job"]) == "refinement_job"
    for argv in (["pytest"], ["dagster", "dev"], ["dagster", "api", "grpc", "-m", "defs"], ["-c"]):
        assert job_to_execute(argv) is None, argv
    assert step_server_preload("dataset_job")[1:] == CHAIN_PRELOADED_MODULES
    assert step_server_preload("refinement_job")[1:] == PRELOADED_MODULES
    monkeypatch.setenv(EXECUTOR_ENV, "celery")  # Celery workers, not a fork server, run the steps
    assert not start_step_server_early(["dagster", "job", "execute", "-j", "dataset_job"])


@dg.job
def ui_launched_job() -> None:
    pass


def test_a_run_a_code_server_started_knows_its_job():
    # how the UI's and the sensors' runs execute: the code server spawns a process for each run whose target
    # is Dagster's start_run_in_subprocess, given the reconstructable job
    from dagster._grpc.impl import start_run_in_subprocess

    spawn = multiprocessing.get_context("spawn")
    run_args = ["{}", dg.reconstructable(ui_launched_job), None, None]
    run_process = spawn.Process(target=start_run_in_subprocess, args=run_args)
    assert job_to_execute(["dagster", "api", "grpc"], run_process) == "ui_launched_job"
    assert job_to_execute(["dagster", "api", "grpc"], spawn.Process(target=print, args=run_args)) is None
    assert job_to_execute(["dagster", "api", "grpc"], multiprocessing.current_process()) is None


def test_the_code_location_runs_steps_on_the_forkserver_executor():
    assert defs().executor is STEP_EXECUTOR
    # the per-dataset chain's server leaves nnU-Net out (it neither trains nor predicts); both warm the
    # Dagster storage layer and the definitions every step would otherwise load itself
    assert defs().resolve_job_def("dataset_job").executor_def is CHAIN_STEP_EXECUTOR
    assert set(HEAVY_MODULES) <= set(PRELOADED_MODULES)
    assert not set(HEAVY_MODULES) & set(CHAIN_PRELOADED_MODULES)
    assert "nnsam2_assets.step_preload" in set(PRELOADED_MODULES) & set(CHAIN_PRELOADED_MODULES)


def test_the_definitions_are_built_once_per_environment(monkeypatch):
    assert defs() is defs()
    before = defs()
    assert before.resources["refinement"].num_epochs == 0  # the profile's own budget
    monkeypatch.setenv(NNUNET_EPOCHS_ENV, "3")  # the resources read it when the definitions are built
    changed = defs()
    assert changed is not before and changed is defs()
    assert changed.resources["refinement"].num_epochs == dg.EnvVar.int(NNUNET_EPOCHS_ENV)


def test_a_step_calling_os_exit_fails_alone(tmp_path):
    result = _run_in_fresh_interpreter("run_crash_job", tmp_path)
    assert not result["success"]
    assert (result["failed"], result["succeeded"]) == (["crashes"], ["survives"])
    assert result["step_pid"] != result["orchestrator"]  # a process of its own
    assert result["preloaded"] == len(PRELOADED_MODULES)
