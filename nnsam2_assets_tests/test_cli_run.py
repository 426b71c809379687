"""``nnsam2 run`` as a user runs it, in-process (``cli.main``) in a temporary home: a good dataset and a bad
one (unreadable annotation, one unreadable scan), run three times with the cheapest nnU-Net budget that
trains all three stages (1 epoch x 2 iterations, through NNSAM2_NNUNET_EPOCHS / _ITERATIONS).

1. ``nnsam2 run``: everything materialized once, models trained, exit code 1 naming the bad dataset and scan;
2. ``nnsam2 run`` again: nothing recomputed, no model trained;
3. ``nnsam2 run good -v --retrain``: exit code 0, the events on the console too, and the model stages run
   but keep their models (their training sets are unchanged, and a model version is their hash).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import dagster as dg
import pytest

from nnsam2_assets import cli
from nnsam2_assets.core import layout
from nnsam2_assets.defs.resources import NNUNET_EPOCHS_ENV, NNUNET_ITERATIONS_ENV
from nnsam2_assets.demo.datasets import write_demo_dataset
from nnsam2_assets.ingest.scans import read_manifest
from nnsam2_assets.pipeline import MODELS, OUTPUTS, PER_DATASET, SUPERVOXELS
from nnsam2_assets.refinement.models import STAGES
from nnsam2_assets.refinement.nnunet import MODEL_INFO_FILE


@dataclass
class Call:
    code: int
    out: str
    err: str
    run_ids: set[str]  # the Dagster runs this call added to the home's run list

    @property
    def console(self) -> str:
        return self.out + self.err

    @property
    def log_file(self) -> Path:
        return Path(re.search(r"log file: (\S+)", self.out).group(1))


@dataclass
class Runs:
    storage: Path
    dagster_home: Path
    first: Call
    second: Call
    only_good: Call
    models_after_first: dict[str, list[str]]
    models_after_second: dict[str, list[str]]


def _model_dirs(storage: Path) -> dict[str, list[str]]:
    """Each stage's trained model folders (a version folder holds the model info file)."""
    return {
        stage: sorted(p.parent.name for p in layout.model_root(storage, stage).glob(f"*/{MODEL_INFO_FILE}"))
        for stage in STAGES
    }


def _run_ids(dagster_home: Path) -> set[str]:
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        return {run.run_id for run in instance.get_runs()}


def _call(dagster_home: Path, *argv: str) -> Call:
    before = _run_ids(dagster_home) if (dagster_home / "dagster.yaml").exists() else set()
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(list(argv))
    return Call(code, out.getvalue(), err.getvalue(), _run_ids(dagster_home) - before)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Runs:
    root = tmp_path_factory.mktemp("nnsam2_run")
    data, storage, home = root / "data", root / "storage", root / "home"
    # no regions.csv: the other scan's region is found from the reference's (a cohort without hand work)
    write_demo_dataset(data, "good", "dixon", 2, 0, shape_yx=(64, 64), regions_csv=False)
    bad = write_demo_dataset(data, "bad", "ct", 2, 1, shape_yx=(64, 64))
    (bad / "annotation.nii.gz").write_bytes(b"not a NIfTI file")
    (bad / "scans" / "subj01.nii.gz").write_bytes(b"not a NIfTI file either")
    # patch.dict restores the whole environment, so the roots that ``--data-root``/``--storage-root`` set
    # in this process do not leak into later tests of the same worker (monkeypatch forgets unset names)
    with pytest.MonkeyPatch.context() as mp, mock.patch.dict(os.environ):
        mp.setenv(layout.HOME_ENV, str(home))
        mp.setenv("DAGSTER_HOME", str(home / "dagster_home"))
        mp.setenv(NNUNET_EPOCHS_ENV, "1")
        mp.setenv(NNUNET_ITERATIONS_ENV, "2")
        for name in (layout.DATA_ROOT_ENV, layout.STORAGE_ROOT_ENV, layout.DUCKDB_ENV):
            mp.delenv(name, raising=False)
        roots = ("--data-root", str(data), "--storage-root", str(storage))
        first = _call(home / "dagster_home", "run", *roots)
        models_after_first = _model_dirs(storage)
        second = _call(home / "dagster_home", "run", *roots)
        models_after_second = _model_dirs(storage)
        only_good = _call(home / "dagster_home", "run", "good", "-v", "--retrain", *roots)
    return Runs(
        storage,
        home / "dagster_home",
        first,
        second,
        only_good,
        models_after_first,
        models_after_second,
    )


def _materializations(dagster_home: Path, run_ids: set[str]) -> Counter:
    counts: Counter = Counter()
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        for run_id in run_ids:
            for entry in instance.all_logs(run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION):
                mat = entry.asset_materialization
                counts[(mat.asset_key.to_user_string(), mat.partition)] += 1
    return counts


def _metadata(dagster_home: Path, run_ids: set[str], asset: str, partition: str) -> dict:
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        for run_id in run_ids:
            for entry in instance.all_logs(run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION):
                mat = entry.asset_materialization
                if mat.asset_key.to_user_string() == asset and mat.partition == partition:
                    return {k: v.value for k, v in mat.metadata.items()}
    raise AssertionError(f"no materialization of {asset}[{partition}] in {run_ids}")


def test_first_run_materializes_every_asset_once_in_the_homes_runs(runs: Runs):
    from nnsam2_assets.definitions import all_assets

    counts = _materializations(runs.dagster_home, runs.first.run_ids)
    expected = {(a, "good"): 1 for a in PER_DATASET + OUTPUTS} | {(m, None): 1 for m in MODELS}
    assert {k: v for k, v in counts.items() if k[1] != "bad"} == expected
    # every materializable asset but the optional supervoxels (run when the models sample on them);
    # corrections is external (recorded when a user drops one, none here)
    every_asset = {
        key.to_user_string() for a in all_assets() if isinstance(a, dg.AssetsDefinition) for key in a.keys
    }
    assert every_asset == {k[0] for k in expected} | set(SUPERVOXELS)
    assert {a.key.to_user_string() for a in all_assets() if isinstance(a, dg.AssetSpec)} == {"corrections"}
    # the bad dataset: its scans were ingested (one of them failed), nothing after its annotation ran
    assert counts[("scans", "bad")] == 1 and ("reference_annotation", "bad") not in counts
    assert not any(k[1] == "bad" and k[0] in PER_DATASET[3:] + OUTPUTS for k in counts)
    # one run per dataset for the chain, one for the models, one per good dataset for the outputs
    assert len(runs.first.run_ids) == 4
    assert "models: trained (no stage1 model yet)" in runs.first.out
    assert all(len(v) == 1 for v in runs.models_after_first.values()), runs.models_after_first
    # the good dataset has no regions.csv: the reference's region is dataset.yaml's, the other scan's found
    manifest = read_manifest(layout.DatasetLayout(runs.storage, "good"))
    assert sorted(manifest.region_source) == ["dataset.yaml", "found"]
    assert manifest.l4_l5_slice.notna().all()


def test_exit_code_and_summary_name_the_bad_dataset_and_scan(runs: Runs):
    out = runs.first.out
    assert runs.first.code == 1, runs.first.console
    summary = out[out.index("\nsummary") :]
    assert "datasets: 1 of 2 ok (good: 2 scans)" in summary
    assert re.search(r"FAILED dataset bad: reference_annotation: .*annotation\.nii\.gz", summary), summary
    assert re.search(r"FAILED scan bad/subj01: .*subj01\.nii\.gz", summary), summary
    assert "outputs: good" in summary
    assert "FAILED dataset good" not in summary and "FAILED models" not in summary
    assert summary.rstrip().endswith("2 failure(s); exit code 1")


def test_console_shows_progress_and_no_debug_while_the_log_file_holds_the_events(runs: Runs):
    console = runs.first.console
    assert "DEBUG" not in console
    bars = console.replace("\r", "\n")
    assert re.search(r"datasets +100%.*2/2 datasets", bars), bars[-3000:]
    for stage in STAGES:  # each nnU-Net stage counts its training iterations, with tqdm's rate and ETA
        assert re.search(rf"{stage} +100%.*2/2 it \[[0-9:]+<[0-9:]+, epoch 1/1\]", bars), stage
    assert re.search(r"outputs +100%.*1/1 datasets", bars)
    log = runs.first.log_file.read_text()
    assert runs.first.log_file.parent == runs.dagster_home.parent / "logs"
    for level, event in (
        ("DEBUG", "STEP_START"),
        ("DEBUG", "ASSET_MATERIALIZATION"),
        ("ERROR", "STEP_FAILURE"),
    ):
        assert re.search(rf" {level} +nnsam2_assets\.run\.dagster: .* - {event} - ", log), event
    assert "nnU-Net epoch 1/1" in log


def test_second_run_with_nothing_changed_recomputes_and_trains_nothing(runs: Runs):
    second = runs.second
    assert second.code == 1  # the bad dataset is still bad
    assert "0 scans recomputed (ingest 0, propagation 0, final masks 0)" in second.out
    stage3 = runs.models_after_first["stage3"][0]
    assert f"models: reused {stage3} (current for good)" in second.out
    assert runs.models_after_second == runs.models_after_first
    counts = _materializations(runs.dagster_home, second.run_ids)
    assert not any(k[0] in MODELS for k in counts), counts
    assert len(second.run_ids) == 3  # no models run
    for asset in ("scans", "propagated_masks", "final_masks"):
        assert _metadata(runs.dagster_home, second.run_ids, asset, "good")["n_recomputed"] == 0, asset
    # a 4-class Dixon dataset annotated on one slice: the UI names the slice its ES/MF split comes from
    assert re.fullmatch(
        r"annotated slice \d+ of the reference's region, from its inferior end",
        _metadata(runs.dagster_home, second.run_ids, "final_masks", "good")["es_mf_split_from"],
    )


def test_a_run_of_good_datasets_exits_0_verbose_shows_the_events_and_retrain_runs_the_models(runs: Runs):
    run = runs.only_good
    assert run.code == 0, run.console
    assert "datasets: good" in run.out and "FAILED" not in run.out
    assert run.out.rstrip().endswith("nnsam2 run: finished")
    assert "DEBUG" in run.err and "STEP_START" in run.err
    stage3 = runs.models_after_first["stage3"][0]
    assert f"models: reused {stage3} (ran for --retrain; training sets unchanged)" in run.out
    assert {k[0] for k in _materializations(runs.dagster_home, run.run_ids)} >= set(MODELS)
    assert runs.models_after_first == _model_dirs(runs.storage)
