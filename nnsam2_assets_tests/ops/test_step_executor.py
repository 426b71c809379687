"""The code location's step executor (forkserver, heavy modules preloaded): a step that kills its own process
fails alone; the run's other steps still run, in processes forked from the preloaded server."""

from __future__ import annotations

import os
import sys

import dagster as dg

from nnsam2_assets.definitions import PRELOADED_MODULES, STEP_EXECUTOR, defs


@dg.asset
def crashes() -> None:
    os._exit(3)  # what a segfaulting library or an out-of-memory kill looks like to the executor


@dg.asset
def survives() -> dg.MaterializeResult:
    # forked from the server: the preloaded modules are there before this step imported anything
    preloaded = [m for m in PRELOADED_MODULES if m in sys.modules]
    return dg.MaterializeResult(metadata={"pid": os.getpid(), "preloaded": len(preloaded)})


def crash_job() -> dg.JobDefinition:
    return dg.Definitions(
        assets=[crashes, survives],
        jobs=[dg.define_asset_job("crash_job", executor_def=STEP_EXECUTOR)],
    ).resolve_job_def("crash_job")


def test_the_code_location_runs_steps_on_the_forkserver_executor():
    assert defs().resolve_job_def("dataset_job").executor_def.config_schema is not None
    assert defs().executor is STEP_EXECUTOR


def test_a_step_calling_os_exit_fails_alone(tmp_path):
    with (
        dg.instance_for_test(temp_dir=str(tmp_path)) as instance,
        dg.execute_job(dg.reconstructable(crash_job), instance=instance, raise_on_error=False) as result,
    ):
        assert not result.success
        failed = {e.step_key for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_FAILURE}
        succeeded = {e.step_key for e in result.all_events if e.is_step_success}
        assert failed == {"crashes"} and succeeded == {"survives"}
        (materialization,) = result.asset_materializations_for_node("survives")
        meta = materialization.metadata
        assert meta["pid"].value != os.getpid()  # a process of its own
        assert meta["preloaded"].value == len(PRELOADED_MODULES)
