"""The CLI's answers to ordinary mistakes: one line naming the problem, a failing exit code, nothing run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from nnsam2_assets.testing.cohorts import write_tiny_dataset


def _cli(home: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    environ = {
        **os.environ,
        "NNSAM2_HOME": str(home),
        "NNSAM2_DATA_ROOT": str(home / "data"),
        "NNSAM2_STORAGE_ROOT": str(home / "storage"),
        **env,
    }
    for name in ("NNSAM2_DUCKDB", "DAGSTER_HOME"):
        environ.pop(name, None)
    return subprocess.run(
        [sys.executable, "-m", "nnsam2_assets.cli", *args], capture_output=True, text=True, env=environ
    )


@pytest.mark.parametrize(
    ("variable", "value", "said"),
    [
        ("NNSAM2_NNUNET_PROFILE", "bogus", "unknown nnU-Net profile 'bogus'"),
        ("NNSAM2_NNUNET_EPOCHS", "abc", '"NNSAM2_NNUNET_EPOCHS" cannot be coerced into an int'),
        ("NNSAM2_NNUNET_EPOCHS", "-3", "num_epochs is -3"),
        ("NNSAM2_EXECUTOR", "Celery", "NNSAM2_EXECUTOR='Celery'"),
        ("NNSAM2_PROPAGATION_WORKERS", "-3", "NNSAM2_PROPAGATION_WORKERS='-3': a whole number"),
        ("NNSAM2_SENSOR_INTERVAL_S", "30s", "NNSAM2_SENSOR_INTERVAL_S='30s': a whole number, 1 or more"),
        ("NNSAM2_MAX_RUNS_PER_TICK", "0", "NNSAM2_MAX_RUNS_PER_TICK='0': a whole number, 1 or more"),
        (
            "NNSAM2_SAM2_CHECKPOINT",
            "/no/such/sam2.1_hiera_tiny.pt",
            "/no/such/sam2.1_hiera_tiny.pt (NNSAM2_SAM",
        ),
    ],
)
def test_an_invalid_setting_stops_the_run_before_anything_runs(tmp_path, variable, value, said):
    """It had surfaced as a traceback after every dataset was ingested and propagated."""
    write_tiny_dataset(tmp_path / "data", "ds", 2)
    out = _cli(tmp_path, "run", **{variable: value})
    assert out.returncode == 2, out.stderr
    (line,) = out.stderr.strip().splitlines()
    assert line.startswith("nnsam2 run: invalid setting (NNSAM2_* environment variables): ") and said in line
    assert not (tmp_path / "storage").exists()


def test_register_says_when_there_is_nothing_to_register(tmp_path):
    missing = _cli(tmp_path, "register")
    assert missing.returncode == 1
    assert missing.stderr.strip() == f"nnsam2 register: no data root {tmp_path / 'data'} (NNSAM2_DATA_ROOT)"
    (tmp_path / "data").mkdir()
    empty = _cli(tmp_path, "register")
    assert empty.returncode == 1 and "no dataset folder (a folder with a dataset.yaml) in" in empty.stderr
    write_tiny_dataset(tmp_path / "data", "ds", 2)
    first = _cli(tmp_path, "register")
    assert first.returncode == 0 and first.stdout.strip() == "registered ds"
    again = _cli(tmp_path, "register")
    assert again.returncode == 0 and "registered already" in again.stdout


def test_a_report_of_a_dataset_never_run_is_refused(tmp_path):
    """It exited 0 with an empty report where the metrics database existed (another dataset had been run)."""
    import duckdb

    write_tiny_dataset(tmp_path / "data", "ds", 2)
    (tmp_path / "storage").mkdir()
    duckdb.connect(str(tmp_path / "storage" / "nnsam2.duckdb")).close()
    out = _cli(tmp_path, "report", "ds")
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.strip() == "nnsam2 report: dataset 'ds' has not been run yet: `nnsam2 run` first"


@pytest.mark.parametrize("scans", ["0", "-1", "two"])
def test_demo_refuses_a_cohort_without_scans(tmp_path, scans):
    out = _cli(tmp_path, "demo", "--scans", scans)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert f"--scans: {scans!r}: a whole number, 1 or more" in out.stderr
    assert not (tmp_path / "data").exists()


def test_escape_sequences_in_users_names_never_reach_the_terminal(tmp_path):
    """A folder named with an escape sequence could retitle or clear the user's terminal through a message."""
    from nnsam2_assets.core.terminal import terminal_safe

    assert terminal_safe("a\x1b]0;PWNED\x07\x1b[2J b\nc") == "a\\x1b]0;PWNED\\x07\\x1b[2J b\nc"
    write_tiny_dataset(tmp_path / "data", "ds", 2)
    (tmp_path / "data" / "ds").rename(tmp_path / "data" / "x\x1b[2J")
    out = _cli(tmp_path, "register")
    assert out.returncode == 1 and "refused x\\x1b[2J: invalid dataset name" in out.stderr
    assert "\x1b" not in out.stderr + out.stdout


STOP_ON_SIGNALS = """
import threading
from nnsam2_assets.cli import stop_on_signals
stopping = threading.Event()
print(",".join(sig.name for sig in stop_on_signals(stopping)), flush=True)
stopping.wait()
print("stopping", flush=True)
"""


@pytest.mark.parametrize("nohup", [False, True])
def test_nnsam2_ui_stops_its_session_on_a_hangup_unless_started_under_nohup(nohup):
    """Closing the terminal (or a dropped SSH session) killed only ``nnsam2 ui``: ``dagster dev``, in its own
    session, ran on with its daemon, code server and runs, holding the port."""
    import signal

    def hangup_as_a_terminal_or_nohup_leaves_it() -> None:  # not as this test process happens to have it
        signal.signal(signal.SIGHUP, signal.SIG_IGN if nohup else signal.SIG_DFL)

    proc = subprocess.Popen(
        [sys.executable, "-c", STOP_ON_SIGNALS],
        stdout=subprocess.PIPE,
        text=True,
        preexec_fn=hangup_as_a_terminal_or_nohup_leaves_it,
    )
    try:
        handled = proc.stdout.readline().strip().split(",")
        assert handled[:2] == ["SIGINT", "SIGTERM"] and ("SIGHUP" in handled) != nohup
        if not nohup:
            proc.send_signal(signal.SIGHUP)
            assert proc.stdout.readline().strip() == "stopping" and proc.wait() == 0
    finally:
        proc.kill()
        proc.wait()


INTERRUPTED_RUN = """
import os, signal, threading, time
import dagster as dg
from nnsam2_assets.runner import _run

@dg.asset
def slow() -> None:
    threading.Timer(0.2, lambda: os.kill(os.getpid(), signal.SIGINT)).start()  # Ctrl-C during the step
    while True:
        time.sleep(0.1)

@dg.asset
def after() -> None:
    print("the next run started", flush=True)

instance = dg.DagsterInstance.ephemeral()
try:
    for assets in ([slow], [after]):
        _run(assets, None, instance, {})
except KeyboardInterrupt:
    print("interrupted", flush=True)
"""


def test_ctrl_c_during_a_step_stops_nnsam2_run_instead_of_starting_the_next_run():
    """Dagster ends an interrupted in-process run as a failure and returns normally: ``nnsam2 run`` recorded
    the dataset as failed and went on with the next one, then the models (hours of training)."""
    out = subprocess.run([sys.executable, "-c", INTERRUPTED_RUN], capture_output=True, text=True)
    assert out.stdout.splitlines() == ["interrupted"], (out.stdout, out.stderr[-2000:])


def test_a_sam2_model_the_package_does_not_ship_stops_the_run_before_anything_runs(tmp_path):
    """The CLI read only the checkpoint: a large model's checkpoint ran with the tiny model's config and
    failed every dataset's propagation after its ingest. Its config and frame size are settings now."""
    write_tiny_dataset(tmp_path / "data", "ds", 2)
    checkpoint = tmp_path / "sam2.1_hiera_large.pt"
    checkpoint.write_bytes(b"weights")
    for variable, value, said in (
        (
            "NNSAM2_SAM2_CONFIG",
            "configs/sam2.1/sam2.1_hiera_huge.yaml",
            "'configs/sam2.1/sam2.1_hiera_huge.yaml'",
        ),
        (
            "NNSAM2_SAM2_IMAGE_SIZE",
            "80",  # a multiple of 16 that the model cannot take
            "(NNSAM2_SAM2_IMAGE_SIZE or the propagation resource): image_size must be",
        ),
    ):
        out = _cli(tmp_path, "run", NNSAM2_SAM2_CHECKPOINT=str(checkpoint), **{variable: value})
        assert out.returncode == 2 and said in out.stderr, out.stderr
        assert not (tmp_path / "storage").exists()


def test_the_sam2_settings_reach_the_propagation_resource(monkeypatch):
    from nnsam2_assets.defs.resources import build_resources, resolved

    monkeypatch.setenv("NNSAM2_SAM2_CONFIG", "configs/sam2.1/sam2.1_hiera_l.yaml")
    monkeypatch.setenv("NNSAM2_SAM2_IMAGE_SIZE", "1024")
    config = resolved(build_resources()["propagation"]).config()
    assert (config.sam2_config, config.sam2_image_size) == ("configs/sam2.1/sam2.1_hiera_l.yaml", 1024)


def test_demo_checks_its_settings_and_seed_before_writing_the_cohort(tmp_path):
    out = _cli(tmp_path, "demo", NNSAM2_PROPAGATION_WORKERS="abc")
    assert out.returncode == 2 and "nnsam2 demo: invalid setting" in out.stderr
    seed = _cli(tmp_path, "demo", "--seed", "-1")
    assert seed.returncode == 2 and "--seed: '-1': a whole number, 0 or more" in seed.stderr
    assert "Traceback" not in out.stderr + seed.stderr and not (tmp_path / "data").exists()


def test_a_fresh_demo_cohort_replaces_the_earlier_one_whole_and_never_a_users_folder(tmp_path):
    from nnsam2_assets.demo.datasets import DEMO_DATASETS, DemoFolderError, write_demo_cohort
    from nnsam2_assets.ingest.convention import load_dataset

    write_demo_cohort(tmp_path, scans_per_dataset=3)
    write_demo_cohort(tmp_path, scans_per_dataset=2)  # the third scans had stayed beside the new ones
    for name in DEMO_DATASETS:
        assert len(load_dataset(tmp_path, name).scans) == 2, name
    users = tmp_path / "other" / DEMO_DATASETS[0]  # a user's own dataset that happens to have the name
    (users / "scans").mkdir(parents=True)
    (users / "dataset.yaml").write_text("modality: ct\ndescription: our lumbar CT\n")
    with pytest.raises(DemoFolderError, match="not a demo dataset"):
        write_demo_cohort(tmp_path / "other")
    assert (users / "scans").is_dir() and "our lumbar CT" in (users / "dataset.yaml").read_text()


def test_a_demo_cohort_partly_there_is_kept_and_run_as_it_is(tmp_path):
    """With one demo dataset deleted, ``nnsam2 demo`` had rewritten both, deleting a correction the user had
    dropped into the other."""
    import shutil

    from nnsam2_assets.cli import demo_datasets
    from nnsam2_assets.demo.datasets import DEMO_DATASETS

    assert demo_datasets(tmp_path, False, None, 2) == sorted(DEMO_DATASETS)
    kept, gone = DEMO_DATASETS
    correction = tmp_path / kept / "corrections" / "subj01.nii.gz"
    correction.parent.mkdir()
    correction.write_bytes(b"the user's edit")
    shutil.rmtree(tmp_path / gone)
    assert demo_datasets(tmp_path, False, None, None) == [kept] and correction.exists()
    assert demo_datasets(tmp_path, True, None, 2) == sorted(DEMO_DATASETS) and not correction.exists()
    # a first write interrupted (Ctrl-C) before the second dataset's dataset.yaml: written again, both
    (tmp_path / gone / "dataset.yaml").unlink()
    assert demo_datasets(tmp_path, False, None, 2) == sorted(DEMO_DATASETS)
    # killed (not Ctrl-C) while writing its regions.csv: the atomic write's temp file stays beside the others
    (tmp_path / gone / "dataset.yaml").unlink()
    (tmp_path / gone / ".tmp-k2j3h4.part").write_text("scan,first")
    assert demo_datasets(tmp_path, False, None, 2) == sorted(DEMO_DATASETS)
    assert not (tmp_path / gone / ".tmp-k2j3h4.part").exists()


def test_every_command_takes_the_roots_that_run_was_given(tmp_path):
    """``nnsam2 demo --storage-root X`` ends by suggesting ``nnsam2 sql``, which took no root and looked in the
    default storage root."""
    import duckdb

    storage = tmp_path / "elsewhere"
    storage.mkdir()
    with duckdb.connect(str(storage / "nnsam2.duckdb")) as db:
        db.execute("CREATE SCHEMA metrics; CREATE TABLE metrics.scan_metrics AS SELECT 41 + 1 AS answer")
    out = _cli(tmp_path, "sql", "--storage-root", str(storage), "SELECT answer FROM metrics.scan_metrics")
    assert out.returncode == 0 and out.stdout.split() == ["answer", "42"], out.stderr
    from nnsam2_assets.cli import build_parser

    for command in (
        ["register"],
        ["ui"],
        ["export", "scan_metrics", "o.csv"],
        ["report", "ds"],
        ["propose", "ds"],
    ):
        args = build_parser().parse_args(
            [command[0], "--data-root", "d", "--storage-root", "s", *command[1:]]
        )
        assert (args.data_root, args.storage_root) == ("d", "s"), command


def test_nnsam2_ui_outside_the_repository_loads_the_code_location_under_its_name(tmp_path, monkeypatch):
    """``nnsam2 ui`` from any folder but the repository's had failed: "Path 'workspace.yaml' does not exist"."""
    import yaml

    from nnsam2_assets.cli import _workspace_file
    from nnsam2_assets_tests.ops import REPO

    monkeypatch.setenv("NNSAM2_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    monkeypatch.chdir(tmp_path)
    written = yaml.safe_load(_workspace_file().read_text())
    assert written == yaml.safe_load((REPO / "workspace.yaml").read_text())
