"""Resources come from environment variables through ``dg.EnvVar``, and load with none set."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import pytest

from nnsam2_assets.core import layout
from nnsam2_assets.core.lifecycle import alive
from nnsam2_assets.defs.pseudolabels import PseudoLabelConfig
from nnsam2_assets.defs.resources import (
    SAM2_CHECKPOINT_ENV,
    PropagationSettings,
    RefinementSettings,
    build_resources,
    resolved,
)
from nnsam2_assets.propagation.settings import PropagationConfig
from nnsam2_assets.pseudolabels.selection import SelectionConfig
from nnsam2_assets.refinement.settings import RefinementConfig

ENV = (
    layout.HOME_ENV,
    layout.DATA_ROOT_ENV,
    layout.STORAGE_ROOT_ENV,
    layout.DUCKDB_ENV,
    SAM2_CHECKPOINT_ENV,
    "DAGSTER_HOME",
)


@pytest.fixture
def bare_env(monkeypatch, tmp_path):
    for name in ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _resolved(resources: dict) -> dict:
    """The resources as a run sees them (EnvVars resolved), built by Dagster itself."""

    @dg.asset(required_resource_keys={"storage", "metrics_db", "propagation"})
    def probe(context) -> dict:
        r = context.resources
        return {
            "data": r.storage.data,
            "root": r.storage.root,
            "duckdb": Path(r.metrics_db.database),
            "checkpoint": r.propagation.sam2_checkpoint,
            "backend": r.propagation.config().resolved_backend(),
        }

    result = dg.materialize([probe], resources=resources)
    assert result.success
    return result.output_for_node("probe")


def test_resources_load_with_no_environment_variable_set(bare_env):
    seen = _resolved(build_resources())
    home = (bare_env / ".nnsam2").resolve()
    assert seen["data"] == home / "data" and seen["root"] == home / "storage"
    assert seen["duckdb"] == home / "storage" / "nnsam2.duckdb"
    assert seen["checkpoint"] == "" and seen["backend"] == "registration"


def test_resources_read_their_environment_variables(bare_env, monkeypatch):
    ckpt = bare_env / "sam2.pt"
    ckpt.write_bytes(b"")
    monkeypatch.setenv(layout.DATA_ROOT_ENV, str(bare_env / "d"))
    monkeypatch.setenv(layout.STORAGE_ROOT_ENV, str(bare_env / "s"))
    monkeypatch.setenv(SAM2_CHECKPOINT_ENV, str(ckpt))
    resources = build_resources()
    # the UI shows which variable a value came from
    assert isinstance(resources["storage"].data_root, dg.EnvVar)
    assert resources["storage"].data_root.env_var_name == layout.DATA_ROOT_ENV
    seen = _resolved(resources)
    assert seen["data"] == bare_env / "d" and seen["root"] == bare_env / "s"
    assert seen["duckdb"] == bare_env / "s" / "nnsam2.duckdb"
    assert seen["checkpoint"] == str(ckpt)


def test_explicit_roots_win_over_the_environment(bare_env, monkeypatch):
    monkeypatch.setenv(layout.STORAGE_ROOT_ENV, str(bare_env / "elsewhere"))
    seen = _resolved(build_resources(bare_env / "d", bare_env / "s"))
    assert seen["root"] == (bare_env / "s").resolve() and seen["duckdb"] == bare_env / "s" / "nnsam2.duckdb"


def test_an_empty_root_setting_is_the_default_not_the_current_folder(bare_env, monkeypatch):
    """``NNSAM2_STORAGE_ROOT=`` (a compose file passing on an unset host variable) resolved to the folder the
    process started in, and every model and database landed there."""
    for name in (layout.HOME_ENV, layout.DATA_ROOT_ENV, layout.STORAGE_ROOT_ENV, layout.DUCKDB_ENV):
        monkeypatch.setenv(name, "")
    home = (bare_env / ".nnsam2").resolve()
    assert (layout.home(), layout.data_root(), layout.storage_root()) == (
        home,
        home / "data",
        home / "storage",
    )
    assert layout.duckdb_path() == home / "storage" / "nnsam2.duckdb"


def test_a_metrics_database_named_like_its_schema_is_refused_before_anything_runs(bare_env, monkeypatch):
    """DuckDB names a database after its file: with ``metrics.duckdb`` every statement on ``metrics.<table>``
    failed as an ambiguous catalog, after the whole pipeline had run."""
    from nnsam2_assets.defs.resources import settings_problem
    from nnsam2_assets.metrics.store import MetricsDBError, connect

    monkeypatch.setenv(layout.DUCKDB_ENV, str(bare_env / "Metrics.duckdb"))
    problem = settings_problem()
    assert problem is not None and problem.startswith(f"{layout.DUCKDB_ENV}={bare_env / 'Metrics.duckdb'}: ")
    with pytest.raises(MetricsDBError, match="clashes with the metrics schema"):
        connect(bare_env / "metrics.db")  # nnsam2 sql --db
    monkeypatch.setenv(layout.DUCKDB_ENV, str(bare_env / "cohort-metrics.duckdb"))
    assert settings_problem() is None


@pytest.mark.parametrize(
    ("schema", "domain"),
    [
        (PropagationSettings, PropagationConfig),
        (RefinementSettings, RefinementConfig),
        (PseudoLabelConfig, SelectionConfig),
    ],
)
def test_run_configuration_mirrors_the_domain_settings_and_their_defaults(schema, domain):
    """The Dagster schemas take their defaults from the domain dataclasses; a field added to one and not the
    other would be a setting the UI cannot change, or one silently dropped."""
    assert set(schema.model_fields) == {f.name for f in dataclasses.fields(domain)}
    assert schema().model_dump() == dataclasses.asdict(domain())


IN_PROCESS_RUN = """
import os, sys, threading, time
from pathlib import Path
import dagster as dg
from nnsam2_assets.defs.resources import NnsamStorage

report, shell, watched = Path(sys.argv[3]), os.getppid(), []

@dg.asset
def outlives_its_shell(storage: NnsamStorage) -> None:
    print("running", flush=True)  # the shell exits now, as after `nohup nnsam2 run &` and logging out
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
    while os.getppid() == shell:
        time.sleep(0.1)
    # the orphan watch is for step workers: whether one runs here is a fact, not a race against its poll
    watched.append(any(t.name == "exit-with-parent" for t in threading.enumerate()))

storage = NnsamStorage(data_root=sys.argv[1], storage_root=sys.argv[2])
result = dg.materialize([outlives_its_shell], resources={"storage": storage}, raise_on_error=False)
report.write_text(f"success {result.success} watched {watched}")
"""

SHELL = """
import subprocess, sys
child = subprocess.Popen([sys.executable, "-c", *sys.argv[1:]], start_new_session=True,
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
assert child.stdout.readline().strip() == "running"
print(child.pid, flush=True)
"""


def test_an_in_process_run_outlives_the_shell_that_started_it(tmp_path):
    """``nohup nnsam2 run &``, then logging out: the run goes on (the orphan watch is for step workers)."""
    report = tmp_path / "report"
    args = [IN_PROCESS_RUN, str(tmp_path / "data"), str(tmp_path / "store"), str(report)]
    shell = subprocess.run([sys.executable, "-c", SHELL, *args], capture_output=True, text=True, check=True)
    child = int(shell.stdout)
    while alive({child}):  # no deadline: however slow the machine, it ends
        time.sleep(0.2)
    assert report.read_text() == "success True watched [False]"


def test_nnsam_takes_the_propagation_resources_checkpoint_set_in_the_launchpad():
    """A checkpoint set on ``propagation`` in run config had reached only the propagation: nnSAM trained the
    shape head alone, and its metadata said ``sam_encoder: none``."""
    from nnsam2_assets.refinement.models import recipe_key

    launchpad = PropagationSettings(backend="sam2", sam2_checkpoint="/weights/sam2.1_hiera_tiny.pt")
    nnsam = RefinementSettings(trainer="nnsam")
    assert nnsam.profile_for(launchpad).sam2_checkpoint == "/weights/sam2.1_hiera_tiny.pt"
    own = RefinementSettings(trainer="nnsam", sam2_checkpoint="/weights/own.pt")
    assert own.profile_for(launchpad).sam2_checkpoint == "/weights/own.pt"
    plain = RefinementSettings()  # the plain trainer's recipe, and so its models' versions, do not move
    assert recipe_key(plain.profile_for(launchpad)) == recipe_key(plain.config().profile_obj())


def test_nnsam_takes_the_checkpoint_and_config_set_on_propagation_even_with_the_environments(monkeypatch):
    """The default resources copied the environment's checkpoint and propagation's default config into the
    refinement resource: a checkpoint and its config set on ``propagation`` in the launchpad then gave nnSAM
    the environment's checkpoint, or the new checkpoint with the tiny model's config (a load failure)."""
    monkeypatch.setenv(SAM2_CHECKPOINT_ENV, "/weights/sam2.1_hiera_tiny.pt")
    refinement = resolved(build_resources()["refinement"]).model_copy(update={"trainer": "nnsam"})
    launchpad = PropagationSettings(
        backend="sam2",
        sam2_checkpoint="/weights/sam2.1_hiera_base_plus.pt",
        sam2_config="configs/sam2.1/sam2.1_hiera_b+.yaml",
    )
    profile = refinement.profile_for(launchpad)
    assert (profile.sam2_checkpoint, profile.sam2_config) == (
        "/weights/sam2.1_hiera_base_plus.pt",
        "configs/sam2.1/sam2.1_hiera_b+.yaml",
    )
    as_run = resolved(build_resources()["propagation"])  # nothing set in the launchpad: the environment's
    assert refinement.profile_for(as_run).sam2_checkpoint == "/weights/sam2.1_hiera_tiny.pt"
