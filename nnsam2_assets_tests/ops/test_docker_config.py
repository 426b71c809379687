"""Docker deployment and instance config, checked statically (Docker itself cannot run in CI here)."""

from __future__ import annotations

import importlib
import re
import shlex
import subprocess
import tomllib

import pytest
import yaml

from nnsam2_assets.definitions import defs
from nnsam2_assets_tests.ops import REPO

DOCKER = REPO / "docker"
DAGSTER_SERVICES = ("webserver", "daemon", "user_code")


def _yaml(name: str) -> dict:
    return yaml.safe_load((DOCKER / name).read_text())


def _compose() -> dict:
    return _yaml("docker-compose.yml")


def _cmd(dockerfile: str) -> list[str]:
    """The exec-form CMD of a Dockerfile."""
    lines = [ln for ln in (DOCKER / dockerfile).read_text().splitlines() if ln.startswith("CMD ")]
    assert len(lines) == 1, f"{dockerfile}: expected exactly one CMD"
    return yaml.safe_load(lines[0][4:])


def _env_refs(node) -> set[str]:
    """Every ``{env: NAME}`` referenced anywhere in an instance config block."""
    if isinstance(node, dict):
        found = {node["env"]} if set(node) == {"env"} else set()
        return found.union(*(_env_refs(v) for v in node.values()))
    if isinstance(node, list):
        return set().union(*(_env_refs(v) for v in node))
    return set()


def test_workspace_points_at_the_user_code_service_and_port():
    (entry,) = _yaml("workspace.docker.yaml")["load_from"]
    grpc = entry["grpc_server"]
    services = _compose()["services"]
    assert grpc["host"] in services and grpc["host"] == "user_code"
    cmd = _cmd("Dockerfile.user_code")
    assert cmd[:3] == ["dagster", "api", "grpc"]
    assert int(cmd[cmd.index("-p") + 1]) == int(grpc["port"]) == 4000
    assert str(grpc["port"]) in [str(p) for p in services["user_code"]["expose"]]
    assert re.search(rf"^EXPOSE {grpc['port']}$", (DOCKER / "Dockerfile.user_code").read_text(), re.M)
    # the webserver and daemon load this workspace file, which their image carries
    for name in ("webserver", "daemon"):
        entrypoint = services[name]["entrypoint"]
        assert entrypoint[entrypoint.index("-w") + 1] == "workspace.docker.yaml", name
    assert "workspace.docker.yaml" in (DOCKER / "Dockerfile.dagster").read_text()


def test_location_name_matches_the_dg_project_and_local_workspace():
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    name = pyproject["tool"]["dg"]["project"]["code_location_name"]
    assert name == "nnsam2"
    (docker_entry,) = _yaml("workspace.docker.yaml")["load_from"]
    (local_entry,) = yaml.safe_load((REPO / "workspace.yaml").read_text())["load_from"]
    assert docker_entry["grpc_server"]["location_name"] == name
    assert local_entry["python_module"]["location_name"] == name


def test_user_code_module_is_importable_and_is_the_dg_target():
    cmd = _cmd("Dockerfile.user_code")
    module = cmd[cmd.index("-m") + 1]
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert module == pyproject["tool"]["dg"]["project"]["code_location_target_module"]
    loaded = importlib.import_module(module)
    assert loaded.defs is defs
    assert defs().resolve_job_def("dataset_job") is not None
    # the image installs exactly this package
    assert "COPY nnsam2_assets nnsam2_assets" in (DOCKER / "Dockerfile.user_code").read_text()


def test_storage_env_vars_reach_every_dagster_service():
    instance = _yaml("dagster.yaml")
    refs = _env_refs(instance["storage"])
    assert refs == {f"DAGSTER_POSTGRES_{k}" for k in ("USER", "PASSWORD", "HOST", "DB", "PORT")}
    services = _compose()["services"]
    for name in DAGSTER_SERVICES:
        env = services[name]["environment"]
        missing = refs - set(env)
        assert not missing, f"service {name} lacks {sorted(missing)}"
        assert env["DAGSTER_POSTGRES_HOST"] == "postgres" and "postgres" in services
    # the postgres service and the clients agree on user, db and password sources
    pg = services["postgres"]["environment"]
    client = services["user_code"]["environment"]
    assert pg["POSTGRES_USER"] == client["DAGSTER_POSTGRES_USER"]
    assert pg["POSTGRES_DB"] == client["DAGSTER_POSTGRES_DB"]
    assert pg["POSTGRES_PASSWORD"] == client["DAGSTER_POSTGRES_PASSWORD"]


def test_password_comes_only_from_the_environment():
    services = _compose()["services"]
    for name in (*DAGSTER_SERVICES, "postgres"):
        env = services[name]["environment"]
        key = "POSTGRES_PASSWORD" if name == "postgres" else "DAGSTER_POSTGRES_PASSWORD"
        # required interpolation from the caller's environment, no default value
        assert re.fullmatch(r"\$\{DAGSTER_POSTGRES_PASSWORD:\?[^}]*\}", env[key]), (name, env[key])
    assert _yaml("dagster.yaml")["storage"]["postgres"]["postgres_db"]["password"] == {
        "env": "DAGSTER_POSTGRES_PASSWORD"
    }
    # no secret literal anywhere in tracked files: no "password: <literal>" / "PASSWORD=<literal>"
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    assert not (DOCKER / ".env").exists() or "docker/.env" not in tracked
    literal = re.compile(r"(?i)\bpassword\w*\s*[:=]\s*['\"]?(?![\s'\"]*(\$\{|\{|$|env\b|#))[^\s'\"#,}]+")
    offenders = []
    for rel in tracked:
        path = REPO / rel
        if path.suffix not in {".yml", ".yaml", ".toml", ".cfg", ".ini", ".env", ".sh", ""} and not (
            rel.startswith("docker/") or rel.startswith(".ci/")
        ):
            continue
        if not path.is_file():
            continue
        text = path.read_text(errors="ignore")
        offenders += [f"{rel}: {m.group(0)}" for m in literal.finditer(text)]
    assert not offenders, offenders


def test_webserver_is_published_on_loopback_only():
    services = _compose()["services"]
    assert services["webserver"]["ports"] == ["127.0.0.1:3000:3000"]
    for name, service in services.items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"
    assert "ports" not in services["user_code"] and "ports" not in services["postgres"]


def test_user_code_reserves_a_gpu():
    devices = _compose()["services"]["user_code"]["deploy"]["resources"]["reservations"]["devices"]
    assert any(
        d["driver"] == "nvidia" and "gpu" in d["capabilities"] and d.get("count", 0) in (1, "all")
        for d in devices
    )
    assert "deploy" not in _compose()["services"]["webserver"]  # webserver and daemon are CPU only


def test_dagster_images_pin_the_resolving_versions():
    text = (DOCKER / "Dockerfile.dagster").read_text()
    pins = dict(re.findall(r"(dagster[\w-]*)==([\d.]+)", text))
    assert pins["dagster"] == "1.13.27" and pins["dagster-webserver"] == "1.13.27"
    assert pins["dagster-postgres"].startswith("0.29.")
    cmd = shlex.join(_cmd("Dockerfile.user_code"))
    assert "-h 0.0.0.0" in cmd  # container network only; compose publishes no port for it


# --- pools: config side (the asset side is in nnsam2_assets_tests/defs/test_defs.py) ---


def test_pool_default_limit_is_one_in_both_instance_configs():
    from nnsam2_assets.cli import INSTANCE_YAML

    for name, cfg in (
        ("docker/dagster.yaml", _yaml("dagster.yaml")),
        ("cli INSTANCE_YAML", yaml.safe_load(INSTANCE_YAML)),
    ):
        assert cfg["concurrency"]["pools"]["default_limit"] == 1, name
        assert cfg["concurrency"]["pools"].get("granularity", "op") == "op", name


def test_instance_configs_are_accepted_by_dagster():
    """Both instance configs must load: Dagster 1.13 refuses ``max_concurrent_runs`` under ``run_queue`` or
    ``run_coordinator.config`` next to a ``concurrency`` block (it belongs in ``concurrency.runs``)."""
    import dagster as dg

    from nnsam2_assets.cli import INSTANCE_YAML

    docker_cfg = _yaml("dagster.yaml")
    docker_cfg.pop("storage")  # Postgres: loaded for real in test_postgres.py
    errors = {}
    for name, cfg in (
        ("docker/dagster.yaml", docker_cfg),
        ("cli INSTANCE_YAML", yaml.safe_load(INSTANCE_YAML)),
    ):
        try:
            with dg.instance_for_test(overrides=cfg) as instance:
                assert instance.get_concurrency_config().pool_config.default_pool_limit == 1, name
        except dg.DagsterInvalidConfigError as exc:
            errors[name] = str(exc)
    assert not errors, errors


def test_both_instances_queue_a_second_run_of_a_dataset_behind_the_first():
    """Two runs of one dataset (a sensor tick per 30 s during a slow copy, a UI run beside the nightly sweep)
    wrote its manifest and per-scan files side by side, and a run that saw a half-copied file removed outputs
    the other was writing. The run queue holds a second run of the same partition, not of another one."""
    import dagster as dg
    from dagster._utils.tags import TagConcurrencyLimitsCounter

    from nnsam2_assets.cli import INSTANCE_YAML

    docker_cfg = _yaml("dagster.yaml")
    docker_cfg.pop("storage")
    for name, cfg in (
        ("docker/dagster.yaml", docker_cfg),
        ("cli INSTANCE_YAML", yaml.safe_load(INSTANCE_YAML)),
    ):
        with dg.instance_for_test(overrides=cfg) as instance:
            limits = instance.get_concurrency_config().run_queue_config.tag_concurrency_limits

        def run(dataset: str) -> dg.DagsterRun:
            return dg.DagsterRun(job_name="dataset_job", tags={"dagster/partition": dataset})

        counter = TagConcurrencyLimitsCounter(limits, [run("tum")])
        assert counter.is_blocked(run("tum")), name
        assert not counter.is_blocked(run("demo_ct")), name


def test_gpu_and_duckdb_pools_cover_exactly_their_assets():
    graph = defs().resolve_asset_graph()
    pools = {key.to_user_string(): graph.get(key).pools for key in graph.get_all_asset_keys()}
    assert {k for k, v in pools.items() if v == {"gpu"}} == {
        "propagated_masks",
        "nnunet_stage1",
        "nnunet_stage2",
        "nnunet_stage3",
        "final_masks",
        "supervoxels",  # SAM2's automatic masks and propagation when a checkpoint is set
    }
    assert {k for k, v in pools.items() if v == {"duckdb"}} == {"scan_metrics", "agreement"}


def test_both_instance_files_enable_run_monitoring():
    from nnsam2_assets.cli import INSTANCE_YAML

    for name, cfg in (("docker/dagster.yaml", _yaml("dagster.yaml")), ("cli", yaml.safe_load(INSTANCE_YAML))):
        monitoring = cfg["run_monitoring"]
        assert monitoring["enabled"] is True, name
        assert monitoring["start_timeout_seconds"] > 0 and monitoring["poll_interval_seconds"] > 0, name


@pytest.mark.parametrize(("pip_exit", "bootstrap_fails"), [(1, True), (0, False)])
def test_a_failed_pip_install_fails_the_bootstrap(tmp_path, pip_exit, bootstrap_fails):
    """``pip ... | grep -v ... || true`` swallowed pip's failure: after a lock change the old packages stayed,
    the import check passed on them, and the stamp marked them as the lock's for every later run."""
    script = (REPO / ".ci" / "bootstrap.sh").read_text()
    (definition,) = [line for line in script.splitlines() if line.startswith("pip_q()")]
    fake = tmp_path / ".venv" / "bin" / "python"
    fake.parent.mkdir(parents=True)
    fake.write_text(
        f"#!/bin/sh\necho 'pip: something is ignored'\necho 'pip: a real message'\nexit {pip_exit}\n"
    )
    fake.chmod(0o755)
    run = subprocess.run(
        ["bash", "-c", f"set -euo pipefail\n{definition}\npip_q somepackage\necho continued"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert (run.returncode != 0) == bootstrap_fails, run
    assert ("continued" in run.stdout) != bootstrap_fails
    assert "a real message" in run.stdout and "is ignored" not in run.stdout


@pytest.mark.parametrize("dockerfile", ["Dockerfile.user_code", "Dockerfile.dagster"])
def test_images_run_the_python_the_lock_is_solved_for(dockerfile):
    """The lock is a pip freeze on the bootstrap's Python; an image must start from that Python, not ask a
    distribution's apt for it (Ubuntu 24.04 ships 3.12 alone, so ``apt-get install python3.11`` fails)."""
    (lock_python,) = re.findall(r"NNSAM2_PYTHON:-python(3\.\d+)", (REPO / ".ci/bootstrap.sh").read_text())
    text = (DOCKER / dockerfile).read_text()
    bases = re.findall(r"^FROM\s+(\S+)", text, re.M)
    assert bases == [f"python:{lock_python}-slim-bookworm"], f"{dockerfile}: base {bases}"
    assert set(re.findall(r"python(3\.\d+)", text)) <= {lock_python}, f"{dockerfile}: another Python named"
