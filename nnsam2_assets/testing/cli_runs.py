"""A dataset's per-dataset job launched as a user launches it: ``dagster job execute`` as a fresh process, on a
Dagster home of its own (the launcher-kill and Celery tests, the step-cost benchmark)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import dagster as dg

from nnsam2_assets.cli import INSTANCE_YAML
from nnsam2_assets.core.layout import DATA_ROOT_ENV, HOME_ENV, STORAGE_ROOT_ENV
from nnsam2_assets.defs.partitions import datasets_partitions


def local_home(home: Path, datasets: list[str], instance_yaml: str = INSTANCE_YAML) -> None:
    """A Dagster home with ``instance_yaml`` as its instance and ``datasets`` registered as partitions."""
    home.mkdir(parents=True, exist_ok=True)
    (home / "dagster.yaml").write_text(instance_yaml)
    with dg.DagsterInstance.from_config(str(home)) as instance:
        instance.add_dynamic_partitions(datasets_partitions.name, datasets)


def cli_env(home: Path, data: Path, storage: Path, nnsam2_home: Path) -> dict[str, str]:
    """This process's environment with the Dagster home and the nnsam2 roots a launched run reads."""
    return {
        **os.environ,
        "DAGSTER_HOME": str(home),
        DATA_ROOT_ENV: str(data),
        STORAGE_ROOT_ENV: str(storage),
        HOME_ENV: str(nnsam2_home),
    }


def dataset_job_command(dataset: str) -> list[str]:
    """``dagster job execute`` of the code location's ``dataset_job`` for one dataset partition."""
    tags = json.dumps({"dagster/partition": dataset})
    cmd = [sys.executable, "-m", "dagster", "job", "execute", "-m", "nnsam2_assets.definitions"]
    return [*cmd, "-j", "dataset_job", "--tags", tags]
