"""Shared fixtures. The demo cohort is materialized ONCE per session (the slow part of the suite) and reused
by the end-to-end, metrics, browser and Postgres tests."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import pytest

from nnsam2_assets.core.layout import duckdb_path
from nnsam2_assets.defs.resources import PropagationSettings, RefinementSettings, build_resources
from nnsam2_assets.propagation.parallel import WORKERS_ENV
from nnsam2_assets.testing.machine import machine
from nnsam2_assets.testing.realdata import allow_shared_data

allow_shared_data()  # the real-data datasets link their files into ../shared/data

# The suite's nnU-Net budget: the quick profile's recipe at 4 x 50 iterations per stage instead of 8 x 75, so
# the session's one demo run fits the suite's time budget on a slow 2-core machine. What the tests check here
# is the plumbing (every stage trains, predicts and hands on; the held-out check decides); the default
# profile's accuracy is the accuracy bench's (bench/refinement_bench.py), not the suite's.
SUITE_REFINEMENT = RefinementSettings(num_epochs=4, iterations_per_epoch=50)
# The tests' datasets are a few 64x64 scans, where starting worker processes costs more than it saves: one
# process, except in the demo run (and test_parallel.py), which propagate in two like a user's default.
os.environ.setdefault(WORKERS_ENV, "1")


# test modules that use the session's demo cohort: pytest-xdist runs them all on one worker
TESTS = Path(__file__).parent
DEMO_MODULES = {
    p.relative_to(TESTS.parent).as_posix() for p in TESTS.rglob("test_*.py") if "demo_cohort" in p.read_text()
}


class DemoCohortScheduling:
    """``.ci/test`` runs two pytest-xdist workers. Each takes whole test modules, so a module's fixtures are set
    up once and its tests keep their order, and every demo-cohort module goes to the same worker, so the demo
    is materialized once."""

    @pytest.hookimpl
    def pytest_xdist_make_scheduler(self, config: pytest.Config, log):
        from xdist.scheduler import LoadScopeScheduling

        class DemoCohortOnOneWorker(LoadScopeScheduling):
            def _split_scope(self, nodeid: str) -> str:
                module = nodeid.split("::")[0]
                return "demo_cohort" if module in DEMO_MODULES else module

        return DemoCohortOnOneWorker(config, log)


def pytest_configure(config: pytest.Config) -> None:
    # the hook exists only where pytest-xdist is installed and enabled (plain ``pytest`` works too)
    if hasattr(config.hook, "pytest_xdist_make_scheduler"):
        config.pluginmanager.register(DemoCohortScheduling(), "nnsam2-demo-cohort-scheduling")


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    """The machine beside the suite's time (pytest's last line): timings mean little without the CPU."""
    if hasattr(config, "workerinput"):  # an xdist worker; the controller prints it
        return
    terminalreporter.write_line(f"machine: {machine()}")


@dataclass
class DemoCohort:
    root: Path
    data_root: Path
    storage_root: Path
    instance: dg.DagsterInstance
    resources: dict
    datasets: list[str]
    seconds: float
    timings: dict
    failed: dict

    @property
    def duckdb(self) -> Path:
        return duckdb_path(self.storage_root)


@pytest.fixture(scope="session")
def demo_cohort(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DemoCohort]:
    from nnsam2_assets.demo.datasets import write_demo_cohort
    from nnsam2_assets.runner import materialize_cohort, register_datasets

    root = tmp_path_factory.mktemp("demo")
    data_root, storage_root = root / "data", root / "storage"
    write_demo_cohort(data_root)
    (root / "dagster_home").mkdir()
    with dg.instance_for_test(temp_dir=str(root / "dagster_home")) as instance:
        added, rejected = register_datasets(instance, data_root)
        assert not rejected, rejected
        resources = build_resources(
            data_root, storage_root, refinement=SUITE_REFINEMENT, propagation=PropagationSettings(workers=2)
        )
        t0 = time.perf_counter()
        run = materialize_cohort(instance, sorted(added), resources=resources)
        seconds = time.perf_counter() - t0
        print(f"\ndemo cohort materialized in {seconds:.0f} s: {run.timings}")
        yield DemoCohort(
            root,
            data_root,
            storage_root,
            instance,
            resources,
            sorted(added),
            seconds,
            run.timings,
            run.failed,
        )
