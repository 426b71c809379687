"""The terminal side of ``nnsam2 run``: where the runs' events go, and the progress bars.

Every Dagster event of the runs (DEBUG and up) and every ``nnsam2_assets`` log record go to a log file;
the console gets WARNING and up, or everything with ``verbose``. The Dagster events reach Python logging
through ``dagster_logger``, the run logger that replaces Dagster's console logger in ``runner``'s runs.

Progress: one tqdm bar per stage of the pipeline (datasets, each nnU-Net stage, outputs); a dataset bar
names the dataset and step running now (from the runs' STEP_START events), an nnU-Net bar counts the
training iterations (``refinement.nnunet.training_progress``), with tqdm's rate and ETA.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import dagster as dg
from tqdm import tqdm

from nnsam2_assets.core.terminal import terminal_safe

PACKAGE_LOGGER = "nnsam2_assets"
# the runs' Dagster events are re-logged here (a child of the package logger, so its handlers get them)
DAGSTER_EVENTS_LOGGER = "nnsam2_assets.run.dagster"
FILE_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
BAR_FORMAT = (
    "{desc:<10} {percentage:3.0f}%|{bar:24}| {n_fmt}/{total_fmt} {unit} [{elapsed}<{remaining}{postfix}]"
)


@dg.logger(description="Re-logs the run's events to the nnsam2_assets.run.dagster Python logger.")
def dagster_logger(_init_context) -> logging.Logger:
    logger = logging.getLogger(DAGSTER_EVENTS_LOGGER)
    logger.setLevel(logging.DEBUG)
    return logger


class _ConsoleHandler(logging.Handler):
    """Writes above the progress bars (``tqdm.write``) to the stderr of the moment."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(terminal_safe(self.format(record)), file=sys.stderr)
        except Exception:  # noqa: BLE001 - logging never raises
            self.handleError(record)


class _ConsoleFormatter(logging.Formatter):
    """``LEVEL <dataset>/<step>: message`` for the runs' events, ``LEVEL <logger>: message`` otherwise; one
    line each unless ``verbose`` (tracebacks and the run ids are in the log file)."""

    def __init__(self, verbose: bool) -> None:
        super().__init__()
        self.verbose = verbose

    def format(self, record: logging.LogRecord) -> str:
        meta = getattr(record, "dagster_meta", None)
        if meta and not self.verbose:
            partition = (meta.get("job_tags") or {}).get("dagster/partition")
            where = "/".join(x for x in (partition, meta.get("step_key")) if x) or "run"
            message = str(meta.get("orig_message") or "")
        else:
            where, message = record.name, record.getMessage()
            if record.exc_info and self.verbose:
                message += "\n" + self.formatException(record.exc_info)
        lines = message.strip().splitlines() or [""]
        if not self.verbose and len(lines) > 1:
            lines = [f"{lines[0]} (more in the log file)"]
        return f"{record.levelname} {where}: " + "\n".join(lines)


class _StepWatcher(logging.Handler):
    """Calls ``on_step(step_key, partition or None)`` for every STEP_START event of the runs."""

    def __init__(self, on_step) -> None:
        super().__init__(logging.DEBUG)
        self.on_step = on_step

    def emit(self, record: logging.LogRecord) -> None:
        meta = getattr(record, "dagster_meta", None) or {}
        event = meta.get("dagster_event")
        if event is not None and event.is_step_start and event.step_key:
            self.on_step(event.step_key, (meta.get("job_tags") or {}).get("dagster/partition"))


@contextlib.contextmanager
def run_logging(log_file: Path, verbose: bool, on_step=None) -> Iterator[None]:
    """While the block runs: DEBUG and up to ``log_file``, WARNING and up (everything when ``verbose``) to
    the console; ``on_step(step_key, partition)`` at each step start. Handlers are removed afterwards."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    file_handler = logging.FileHandler(log_file, encoding="utf-8")
    file_handler.setLevel(logging.DEBUG)
    file_handler.setFormatter(logging.Formatter(FILE_FORMAT))
    console = _ConsoleHandler(logging.DEBUG if verbose else logging.WARNING)
    console.setFormatter(_ConsoleFormatter(verbose))
    package = logging.getLogger(PACKAGE_LOGGER)
    handlers: list[logging.Handler] = [file_handler, console]
    if on_step is not None:
        watcher = _StepWatcher(on_step)
        logging.getLogger(DAGSTER_EVENTS_LOGGER).addHandler(watcher)
    saved = package.level, package.propagate
    package.setLevel(logging.DEBUG)
    package.propagate = False  # the root logger's handlers (if any) would print DEBUG records twice
    for handler in handlers:
        package.addHandler(handler)
    try:
        yield
    finally:
        for handler in handlers:
            package.removeHandler(handler)
        if on_step is not None:
            logging.getLogger(DAGSTER_EVENTS_LOGGER).removeHandler(watcher)
        package.setLevel(saved[0])
        package.propagate = saved[1]
        file_handler.close()


def bar(desc: str, total: int | None, unit: str) -> tqdm:
    """A stage's progress bar on stderr (refreshed at most twice a second)."""
    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        file=sys.stderr,
        bar_format=BAR_FORMAT if total is not None else None,
        mininterval=0.5,
        dynamic_ncols=True,
        leave=True,
    )


class TrainingBars:
    """One bar per nnU-Net stage: iterations done of the stage's budget, with the epoch in the postfix. A
    stage whose model is reused never trains and gets no bar (the summary says so)."""

    def __init__(self) -> None:
        self.bars: dict[str, tqdm] = {}

    def __call__(self, progress) -> None:  # refinement.nnunet.TrainingProgress
        stage = Path(progress.model_dir).parent.name
        current = self.bars.get(stage)
        if current is None:
            for other in self.bars.values():  # the previous stage is done training
                other.close()
            current = self.bars[stage] = bar(f"{stage}", progress.total_iterations, "it")
        current.set_postfix_str(f"epoch {progress.epoch}/{progress.num_epochs}", refresh=False)
        current.update(progress.iteration - current.n)

    def close(self) -> None:
        for b in self.bars.values():
            b.close()


# ------------------------------------------------------------------------------------------- the run
# per-scan assets whose metadata says how many scans they computed now (the rest came from their caches)
RECOMPUTED_ASSETS = {"scans": "ingest", "propagated_masks": "propagation", "final_masks": "final masks"}
# failed checks the summary does not repeat: all_scans_readable's failures are the manifest's failed rows
COVERED_CHECKS = {"all_scans_readable"}


@dataclass
class RunReport:
    """What ``run_datasets`` did, for the summary."""

    datasets: list[str]
    log_file: Path
    failures: list[str] = field(default_factory=list)  # "<what>: <why>", in the order they happened
    failed_datasets: set[str] = field(default_factory=set)
    scans: dict[str, int] = field(default_factory=dict)  # dataset -> scans ingested (status ok)
    recomputed: dict[str, dict[str, int]] = field(default_factory=dict)  # dataset -> {asset: n}
    models: str = ""  # the "models: ..." line
    outputs: list[str] = field(default_factory=list)  # datasets with final masks and metrics
    run_ids: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures

    def n_recomputed(self) -> int:
        """Scans computed now by any per-scan asset (a new scan counts once, not once per asset)."""
        return sum(max(per.values(), default=0) for per in self.recomputed.values())

    def recomputed_by_asset(self) -> dict[str, int]:
        return {
            label: sum(per.get(asset, 0) for per in self.recomputed.values())
            for asset, label in RECOMPUTED_ASSETS.items()
        }

    def summary(self) -> list[str]:
        ok = [d for d in self.datasets if d not in self.failed_datasets]
        by_asset = ", ".join(f"{k} {v}" for k, v in self.recomputed_by_asset().items())
        lines = [
            f"datasets: {len(ok)} of {len(self.datasets)} ok"
            + (f" ({', '.join(f'{d}: {self.scans.get(d, 0)} scans' for d in ok)})" if ok else ""),
            f"scans: {sum(self.scans.values())} ingested, {self.n_recomputed()} scans recomputed ({by_asset})",
            f"models: {self.models or 'not run'}",
            f"outputs: {', '.join(self.outputs) or 'none'}",
        ]
        lines += [f"FAILED {failure}" for failure in self.failures]
        lines.append(f"log file: {self.log_file}")
        return lines


def _metadata(result: dg.ExecuteInProcessResult) -> dict[str, dict]:
    out = {}
    for event in result.get_asset_materialization_events():
        mat = event.step_materialization_data.materialization
        out[mat.asset_key.to_user_string()] = {k: v.value for k, v in mat.metadata.items()}
    return out


def _failed_checks(result: dg.ExecuteInProcessResult, dataset: str | None) -> list[str]:
    out = []
    for ev in result.get_asset_check_evaluations():
        if ev.passed or ev.severity != dg.AssetCheckSeverity.ERROR or ev.check_name in COVERED_CHECKS:
            continue
        where = f"dataset {dataset}" if dataset else ev.asset_key.to_user_string()
        out.append(f"{where}: check {ev.check_name} failed: {(ev.description or '').strip()[:300]}")
    return out


def _scan_failures(storage_root: Path, dataset: str) -> list[str]:
    from nnsam2_assets.core.layout import DatasetLayout
    from nnsam2_assets.ingest.scans import read_manifest

    manifest = read_manifest(DatasetLayout(storage_root, dataset))
    out = []
    for scan, row in manifest[manifest.status != "ok"].iterrows():
        why = str(row.get("error") or row.status).strip().splitlines()
        out.append(f"scan {dataset}/{scan}: {why[-1][:300] if why else row.status}")
    return out


def run_datasets(
    instance: dg.DagsterInstance,
    datasets: list[str],
    storage_root: Path,
    log_file: Path,
    retrain: bool = False,
    verbose: bool = False,
) -> RunReport:
    """Materialize ``datasets`` end to end, in ``pipeline.PHASES`` order, through ``runner.materialize_cohort``:
    each dataset's chain, then the pooled models only when ``refinement.models.models_state`` says they are
    not current for the datasets that got through (or ``retrain``), then each dataset's outputs."""
    from nnsam2_assets.defs.resources import build_resources, resolved
    from nnsam2_assets.refinement.models import STAGES, models_state, recipe_key
    from nnsam2_assets.refinement.nnunet import training_progress
    from nnsam2_assets.runner import materialize_cohort

    report = RunReport(list(datasets), log_file)
    log = logging.getLogger("nnsam2_assets.run")
    bars: dict[str, tqdm] = {}
    models_meta: dict[str, dict] = {}

    def on_step(step_key: str, partition: str | None) -> None:
        for b in bars.values():
            b.set_postfix_str(f"{partition}: {step_key}" if partition else step_key)

    def on_result(phase, dataset: str | None, result: dg.ExecuteInProcessResult) -> None:
        report.run_ids.append(result.run_id)
        meta = _metadata(result)
        if dataset is not None:
            if "scans" in meta:
                report.scans[dataset] = int(meta["scans"].get("n_ok", 0))
            per = report.recomputed.setdefault(dataset, {})
            for asset in RECOMPUTED_ASSETS:
                if "n_recomputed" in meta.get(asset, {}):
                    per[asset] = int(meta[asset]["n_recomputed"])
        else:
            models_meta.update(meta)
        report.failures += _failed_checks(result, dataset)
        if not result.success:
            from nnsam2_assets.runner import failure_message

            what = f"dataset {dataset}" if dataset else f"{phase.name} ({', '.join(phase.assets)})"
            if dataset and phase.name != "datasets":
                what += f" {phase.name}"
            report.failures.append(f"{what}: {failure_message(result)}")
            if dataset:
                report.failed_datasets.add(dataset)
            tqdm.write(terminal_safe(f"FAILED {report.failures[-1]}"), file=sys.stderr)
        elif dataset is not None and phase.name == "outputs":
            report.outputs.append(dataset)
        if phase.name in bars:
            if dataset is not None:
                done = "FAILED" if not result.success else f"{report.scans.get(dataset, 0)} scans"
                recomputed = max(report.recomputed.get(dataset, {}).values(), default=0)
                bars[phase.name].set_postfix_str(f"{dataset}: {done}, {recomputed} recomputed", refresh=False)
            bars[phase.name].update(1)

    def phase(name: str, names: list[str]) -> None:
        bars[name] = bar(name, len(names), "datasets")
        try:
            materialize_cohort(
                instance, names, stages=(name,), progress=log.info, loggers={"console": dagster_logger},
                on_result=on_result,
            )  # fmt: skip
        finally:
            bars.pop(name).close()

    with run_logging(log_file, verbose, on_step):
        log.info("nnsam2 run: datasets %s, storage root %s", ", ".join(datasets), storage_root)
        phase("datasets", list(datasets))
        for dataset in datasets:
            report.failures += _scan_failures(storage_root, dataset)
        ok = [d for d in datasets if d not in report.failed_datasets]
        resources = build_resources()
        refinement = resolved(resources["refinement"])
        if ok and refinement.foreground_sampling == "supervoxels":
            phase("supervoxels", ok)  # the models centre their patches on them
            ok = [d for d in ok if d not in report.failed_datasets]
        if ok:
            recipe = recipe_key(refinement.profile_for(resolved(resources["propagation"])))
            state = models_state(storage_root, ok, recipe)
            reason = "--retrain" if retrain else state.reason
            if retrain or not state.current:
                tqdm.write(f"models: training ({reason})", file=sys.stderr)
                training = TrainingBars()
                try:
                    with training_progress(training):
                        run = materialize_cohort(
                            instance, ok, stages=("models",), progress=log.info,
                            loggers={"console": dagster_logger}, on_result=on_result,
                        )  # fmt: skip
                finally:
                    training.close()
                if "models" in run.failed:
                    report.models = f"FAILED ({reason})"
                else:
                    report.models = _models_line(reason, models_meta, STAGES)
            else:
                report.models = f"reused {state.versions['stage3']} (current for {', '.join(ok)})"
            if not report.models.startswith("FAILED"):
                phase("outputs", ok)
    return report


def _models_line(reason: str, meta: dict[str, dict], stages) -> str:
    """What the models phase did, from the stages' metadata (``trained_now``, ``model_version``)."""
    done = {s: meta.get(f"nnunet_{s}", {}) for s in stages}
    trained = [s for s, m in done.items() if m.get("trained_now")]
    versions = ", ".join(
        f"{s} {m.get('model_version', '?')}" + ("" if m.get("trained_now") else " (reused)")
        for s, m in done.items()
    )
    if trained:
        return f"trained ({reason}): {versions}"
    # versions are content hashes: unchanged training sets give the models already trained on them
    return f"reused {done['stage3'].get('model_version', '?')} (ran for {reason}; training sets unchanged)"
