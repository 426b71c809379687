"""``nnsam2``: run, demo, ui, register, sql, export, report, propose.

nnsam2 run [DATASET ...]     materialize the data root's datasets (all when none named) end to end: each
                             dataset's chain, the pooled nnU-Net models (only when missing, when a dataset
                             has no case in their training set, or with --retrain), then final masks and
                             metrics. Progress bars on the console, Dagster's events in <home>/logs/run-*.log
                             (-v: on the console too); exit code 1 when a dataset, scan or model failed.
                             --data-root / --storage-root set NNSAM2_DATA_ROOT / NNSAM2_STORAGE_ROOT
nnsam2 demo                  write the demo cohort when missing, then nnsam2 run on it; print the results
nnsam2 ui                    the web UI with its daemon (dagster dev); Ctrl-C stops every process it started
nnsam2 register [NAME ...]   add dataset folders of the data root as Dagster partitions
nnsam2 sql "SELECT ..."      query the metrics (read-only; waits for a writer to let go)
nnsam2 export TABLE OUT      export a table or query to .csv / .parquet
nnsam2 report DATASET        (re)write the dataset's cohort report (HTML, CSV, XLSX) and print its path
nnsam2 propose DATASET       candidate segments of one reference slice, to relabel into the annotation
Every command takes --data-root / --storage-root, so the commands after `nnsam2 run --storage-root X` find X.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from nnsam2_assets.core import layout
from nnsam2_assets.core.terminal import terminal_safe

INSTANCE_YAML = """\
# Local Dagster instance for nnsam2 (sqlite storage under this folder).
telemetry:
  enabled: false
concurrency:
  runs:
    max_concurrent_runs: 2
    tag_concurrency_limits:  # one run per dataset at a time: two would write its files side by side
      - key: dagster/partition
        value:
          applyLimitPerUniqueValue: true
        limit: 1
  pools:
    default_limit: 1   # one GPU step (propagation, training, prediction) and one DuckDB writer at a time
run_monitoring:        # the daemon fails runs that never start, hang while cancelling or outlive a limit
  enabled: true
  start_timeout_seconds: 300
  cancel_timeout_seconds: 300
  max_resume_run_attempts: 0
  poll_interval_seconds: 30
"""


def ensure_dagster_home() -> Path:
    home = layout.dagster_home()
    os.environ["DAGSTER_HOME"] = str(home)
    home.mkdir(parents=True, exist_ok=True)
    cfg = home / "dagster.yaml"
    if not cfg.exists():
        cfg.write_text(INSTANCE_YAML)
    return home


def _instance():
    import dagster as dg

    ensure_dagster_home()
    return dg.DagsterInstance.get()


def _set_roots(args: argparse.Namespace) -> None:
    """``--data-root`` / ``--storage-root`` set NNSAM2_DATA_ROOT / NNSAM2_STORAGE_ROOT for this run (the
    resources read them when the code location loads)."""
    if getattr(args, "data_root", None):
        os.environ[layout.DATA_ROOT_ENV] = str(Path(args.data_root).expanduser().resolve())
    if getattr(args, "storage_root", None):
        os.environ[layout.STORAGE_ROOT_ENV] = str(Path(args.storage_root).expanduser().resolve())


def _log_file() -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path, n = layout.home() / "logs" / f"run-{stamp}.log", 1
    while path.exists():
        path, n = layout.home() / "logs" / f"run-{stamp}-{n}.log", n + 1
    return path


def _select_datasets(instance, names: list[str]) -> tuple[list[str], list[str]]:
    """The datasets to run (registered as partitions) and the refused ones ("dataset X: refused: why"):
    ``names`` when given, else every dataset folder of the data root."""
    from nnsam2_assets.ingest.convention import (
        DatasetError,
        list_dataset_folders,
        load_dataset,
        validate_dataset_key,
    )
    from nnsam2_assets.runner import register_datasets

    data_root = layout.data_root()
    if not names:
        _, rejected = register_datasets(instance, data_root)
        folders = [f.name for f in list_dataset_folders(data_root) if f.name not in rejected]
        return folders, [f"dataset {name}: refused: {why}" for name, why in rejected.items()]
    chosen, refused = [], []
    known = set(instance.get_dynamic_partitions("datasets"))
    for name in dict.fromkeys(names):
        try:
            validate_dataset_key(name)
            load_dataset(data_root, name)
        except (DatasetError, ValueError) as exc:
            refused.append(f"dataset {name}: refused: {exc}")
            continue
        if name not in known:
            instance.add_dynamic_partitions("datasets", [name])
        chosen.append(name)
    return chosen, refused


def run_pipeline(args: argparse.Namespace, names: list[str], command: str = "nnsam2 run") -> int:
    """Register and materialize ``names`` (every dataset folder when empty) end to end; print the summary.
    Exit code 0 when everything succeeded, 1 when any dataset, scan, check or model failed, 2 for an invalid
    setting (found before anything runs)."""
    from nnsam2_assets.console import run_datasets
    from nnsam2_assets.defs.resources import settings_problem

    t0 = time.perf_counter()
    problem = settings_problem()
    if problem:
        print(f"{command}: invalid setting (NNSAM2_* environment variables): {problem}", file=sys.stderr)
        return 2
    instance = _instance()
    try:
        datasets, refused = _select_datasets(instance, names)
        storage_root = layout.storage_root()
        print(f"{command}: data root {layout.data_root()}, storage root {storage_root}")
        if not datasets:
            for line in refused:
                print(terminal_safe(f"FAILED {line}"))
            print(
                f"{command}: no dataset to run (a dataset is a folder with a dataset.yaml in the data root)"
            )
            return 1
        log_file = _log_file()
        print(f"datasets: {', '.join(datasets)}")
        print(f"log file: {log_file}  (-v: the events on the console too)")
        report = run_datasets(instance, datasets, storage_root, log_file, args.retrain, args.verbose)
    finally:
        instance.dispose()
    report.failures[:0] = refused
    print(f"\nsummary ({time.perf_counter() - t0:.0f} s, {len(report.run_ids)} Dagster runs)")
    for line in report.summary():
        print(terminal_safe(f"  {line}"))
    if report.ok:
        print(f"{command}: finished")
        return 0
    print(f"{command}: {len(report.failures)} failure(s); exit code 1")
    return 1


def cmd_run(args: argparse.Namespace) -> int:
    return run_pipeline(args, list(args.datasets))


def demo_datasets(data_root: Path, fresh: bool, seed: int | None, scans: int | None) -> list[str]:
    """The demo cohort's datasets under ``data_root``, written first when none is there or ``fresh``. A cohort
    partly there is the user's to keep (a correction dropped into it, another seed): it runs as it is."""
    from nnsam2_assets.demo.datasets import DEMO_DATASETS, write_demo_cohort

    present = [name for name in DEMO_DATASETS if (data_root / name / "dataset.yaml").is_file()]
    # a folder without its dataset.yaml is a first write that was interrupted (it writes that file last)
    interrupted = any((data_root / name).is_dir() and name not in present for name in DEMO_DATASETS)
    if fresh or not present or interrupted:
        given = {"seed": seed, "scans_per_dataset": scans}  # else the writer's own defaults
        folders = write_demo_cohort(data_root, **{k: v for k, v in given.items() if v is not None})
        print(f"wrote demo cohort: {', '.join(p.name for p in folders)} under {data_root}")
        return sorted(p.name for p in folders)
    if seed is not None or scans is not None:
        print(f"nnsam2 demo: the cohort under {data_root} is kept (--seed / --scans apply with --fresh)")
    return present


def cmd_demo(args: argparse.Namespace) -> int:
    from nnsam2_assets.defs.resources import settings_problem
    from nnsam2_assets.demo.datasets import DemoFolderError
    from nnsam2_assets.metrics.store import query

    problem = settings_problem()  # before the cohort is written, as before any run
    if problem:
        print(f"nnsam2 demo: invalid setting (NNSAM2_* environment variables): {problem}", file=sys.stderr)
        return 2
    print(f"nnsam2 demo: home {layout.home()}")
    try:
        names = demo_datasets(layout.data_root(), args.fresh, args.seed, args.scans)
    except DemoFolderError as exc:
        print(f"nnsam2 demo: {exc}", file=sys.stderr)
        return 2
    code = run_pipeline(args, names, command="nnsam2 demo")
    if code:
        return code
    db = layout.duckdb_path()
    summary = query(
        db,
        "SELECT dataset, scheme, class_name, count(*) AS scans, round(avg(volume_ml), 1) AS volume_ml, "
        "round(avg(fat_ratio), 3) AS fat_ratio, round(avg(ct_mean_hu), 1) AS hu, round(avg(dice), 3) AS dice "
        "FROM metrics.scan_metrics GROUP BY ALL ORDER BY ALL",
    )
    print("\n" + summary.to_string(index=False))
    print(f"\nfinal masks:   {layout.storage_root() / 'datasets' / '<dataset>' / 'final_masks'}")
    print(f'metrics:       {db}  (try: nnsam2 sql "SELECT * FROM metrics.qc_flags")')
    print("web UI:        nnsam2 ui  (127.0.0.1:3000; Ctrl-C stops it and every process it started)")
    return 0


def stop_on_signals(stopping: threading.Event) -> list[signal.Signals]:
    """Set ``stopping`` on Ctrl-C, SIGTERM and a hangup (the terminal closed, an SSH session dropped): the
    default hangup killed only this process, and ``dagster dev`` in its own session ran on, holding the
    port. A hangup already ignored (``nohup nnsam2 ui &``) stays ignored. Returns the signals handled."""
    handled = [signal.SIGINT, signal.SIGTERM]
    if signal.getsignal(signal.SIGHUP) != signal.SIG_IGN:
        handled.append(signal.SIGHUP)
    for sig in handled:
        signal.signal(sig, lambda *_: stopping.set())
    return handled


# the code location's name: sensor and schedule state, and run history, are kept under it
CODE_LOCATION = "nnsam2"


def _workspace_file() -> Path:
    """``workspace.yaml`` of the working directory (the repository's), else one written into the Dagster home
    that loads this package under the same location name: ``nnsam2 ui`` from any other folder had failed
    with "Path 'workspace.yaml' does not exist"."""
    here = Path("workspace.yaml")
    if here.is_file():
        return here
    import yaml

    path = layout.dagster_home() / "workspace.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    entry = {"python_module": {"module_name": f"{__package__}.definitions", "location_name": CODE_LOCATION}}
    path.write_text(yaml.safe_dump({"load_from": [entry]}, sort_keys=False))
    return path


def cmd_ui(args: argparse.Namespace) -> int:
    """``dagster dev`` in its own session; Ctrl-C, SIGINT, SIGTERM or a hangup stop it and every process it
    started."""
    import subprocess

    from nnsam2_assets.core.lifecycle import stop_session

    ensure_dagster_home()
    cmd = [
        sys.executable,
        "-m",
        "dagster",
        "dev",
        "-w",
        str(args.workspace or _workspace_file()),
        "-h",
        args.host,
        "-p",
        str(args.port),
    ]
    stopping = threading.Event()
    handled = stop_on_signals(stopping)

    def default_signals() -> None:  # a backgrounded shell job starts with SIGINT ignored
        for sig in handled:
            signal.signal(sig, signal.SIG_DFL)

    leader = subprocess.Popen(cmd, start_new_session=True, preexec_fn=default_signals)
    print(
        f"nnsam2 ui: dagster dev on http://{args.host}:{args.port} (pid {leader.pid}); Ctrl-C stops everything"
    )
    while leader.poll() is None and not stopping.wait(0.5):
        pass
    code = stop_session(leader, grace_s=args.grace)
    print(f"nnsam2 ui: stopped (dagster dev exit code {code})")
    return 0 if stopping.is_set() else code


def cmd_register(args: argparse.Namespace) -> int:
    from nnsam2_assets.ingest.convention import list_dataset_folders, load_dataset, validate_dataset_key
    from nnsam2_assets.ingest.errors import DatasetError
    from nnsam2_assets.runner import register_datasets

    instance = _instance()
    if args.names:
        bad = 0
        for name in args.names:
            try:
                validate_dataset_key(name)
                load_dataset(layout.data_root(), name)
            except (DatasetError, ValueError) as exc:
                print(terminal_safe(f"refused {name}: {exc}"), file=sys.stderr)
                bad += 1
                continue
            instance.add_dynamic_partitions("datasets", [name])
            print(f"registered {name}")
        return 1 if bad else 0
    data_root = layout.data_root()
    if not list_dataset_folders(data_root):  # a mistyped NNSAM2_DATA_ROOT registers nothing: say so
        what = "no dataset folder (a folder with a dataset.yaml) in" if data_root.is_dir() else "no data root"
        print(f"nnsam2 register: {what} {data_root} (NNSAM2_DATA_ROOT)", file=sys.stderr)
        return 1
    added, rejected = register_datasets(instance, data_root)
    for name in added:
        print(f"registered {name}")
    for name, reason in rejected.items():
        print(terminal_safe(f"refused {name}: {reason}"), file=sys.stderr)
    if not added and not rejected:
        print(f"nnsam2 register: every dataset folder in {data_root} is registered already")
    return 1 if rejected else 0


def _report_failure(command: str, exc: Exception) -> int:
    """Exit 2 for a refused statement or an unusable database, 1 for a query that DuckDB rejected."""
    from nnsam2_assets.metrics.store import MetricsDBError, one_line

    if isinstance(exc, MetricsDBError):
        print(f"{command}: {exc}", file=sys.stderr)
        return 2
    print(f"{command}: query failed: {one_line(exc) or type(exc).__name__}", file=sys.stderr)
    return 1


def cmd_sql(args: argparse.Namespace) -> int:
    from nnsam2_assets.metrics.store import query

    try:
        df = query(Path(args.db) if args.db else layout.duckdb_path(), args.query, wait_s=args.wait)
    except Exception as exc:  # noqa: BLE001 - a user-facing command prints the reason, never a traceback
        return _report_failure("nnsam2 sql", exc)
    if args.csv:
        df.to_csv(sys.stdout, index=False)
    else:
        print(df.to_string(index=False) if len(df) else "(no rows)")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from nnsam2_assets.metrics.store import export

    try:
        out = export(Path(args.db) if args.db else layout.duckdb_path(), args.what, Path(args.out), args.wait)
    except Exception as exc:  # noqa: BLE001 - a user-facing command prints the reason, never a traceback
        return _report_failure("nnsam2 export", exc)
    print(f"wrote {out}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from nnsam2_assets.core.layout import DatasetLayout
    from nnsam2_assets.ingest.convention import load_dataset
    from nnsam2_assets.ingest.errors import DatasetError
    from nnsam2_assets.metrics.store import MetricsDBError
    from nnsam2_assets.outputs.report import build_report

    try:
        spec = load_dataset(layout.data_root(), args.dataset)
        built = build_report(spec, DatasetLayout(layout.storage_root(), args.dataset), layout.duckdb_path())
    except (DatasetError, MetricsDBError, OSError, ValueError) as exc:  # a locked or missing database too
        print(f"nnsam2 report: {exc}", file=sys.stderr)
        return 1
    print(built.html)
    print(f"rows: {', '.join(str(p) for p in (*built.csv.values(), built.xlsx))}")
    return 0


def cmd_propose(args: argparse.Namespace) -> int:
    from nnsam2_assets.core.layout import DatasetLayout
    from nnsam2_assets.defs.resources import build_resources, resolved
    from nnsam2_assets.ingest.convention import load_dataset
    from nnsam2_assets.ingest.errors import DatasetError
    from nnsam2_assets.supervoxels.steps import method_for, propose_segments

    try:
        spec = load_dataset(layout.data_root(), args.dataset, require_annotation=False)
        method = method_for(resolved(build_resources()["propagation"]).config())
        made = propose_segments(spec, DatasetLayout(layout.storage_root(), args.dataset), method, args.slice)
    except (DatasetError, OSError, ValueError, RuntimeError) as exc:
        print(f"nnsam2 propose: {exc}", file=sys.stderr)
        return 1
    print(
        f"{made.n_segments} candidate segments ({made.method}) of {made.scan}, region slice {made.slice} "
        f"(slice {made.original_slice} of the scan's own file):\n{made.path}\n"
        "Open it over the scan in ITK-SNAP or 3D Slicer, give each muscle's segments its label and erase the "
        "rest, and save the slice as the dataset's annotation."
    )
    return 0


def _whole_number(minimum: int) -> Callable[[str], int]:
    """An argparse type: a whole number of ``minimum`` or more, else one line naming the value."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{text!r}: a whole number, {minimum} or more")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nnsam2", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    roots = argparse.ArgumentParser(add_help=False)  # every command: one run's roots are the next command's
    roots.add_argument("--data-root", help="the folder of dataset folders (sets NNSAM2_DATA_ROOT)")
    roots.add_argument("--storage-root", help="where artefacts and metrics go (sets NNSAM2_STORAGE_ROOT)")
    common = argparse.ArgumentParser(add_help=False, parents=[roots])
    common.add_argument(
        "--retrain",
        action="store_true",
        help="run the nnU-Net stages even when their models are current: they train on every scan ingested "
        "now (a stage whose training set is unchanged keeps its model: versions are content hashes)",
    )
    common.add_argument("-v", "--verbose", action="store_true", help="Dagster's events on the console too")
    run = sub.add_parser(
        "run", parents=[common], help="materialize the data root's datasets end to end (all when none named)"
    )
    run.add_argument("datasets", nargs="*", metavar="DATASET", help="dataset folders to run (default: all)")
    run.set_defaults(func=cmd_run)
    demo = sub.add_parser("demo", parents=[common], help="nnsam2 run on a synthetic demo cohort")
    demo.add_argument("--fresh", action="store_true", help="rewrite the demo data even if present")
    demo.add_argument("--seed", type=_whole_number(0), help="the phantoms' random seed")
    demo.add_argument("--scans", type=_whole_number(1), help="scans per demo dataset")
    demo.set_defaults(func=cmd_demo)
    ui = sub.add_parser(
        "ui", parents=[roots], help="run the web UI, daemon and code server (dagster dev); Ctrl-C stops all"
    )
    ui.add_argument("--host", default="127.0.0.1")
    ui.add_argument("--port", type=int, default=3000)
    ui.add_argument(
        "--workspace",
        default=None,
        help="a Dagster workspace file (default: workspace.yaml here if present, else this package's code "
        "location)",
    )
    ui.add_argument("--grace", type=float, default=30.0, help="seconds for an orderly stop before SIGKILL")
    ui.set_defaults(func=cmd_ui)
    reg = sub.add_parser("register", parents=[roots], help="register dataset folders as partitions")
    reg.add_argument("names", nargs="*")
    reg.set_defaults(func=cmd_register)
    sql = sub.add_parser("sql", parents=[roots], help="query the metrics read-only")
    sql.add_argument("query")
    sql.add_argument("--db", default="")
    sql.add_argument("--wait", type=float, default=30.0, help="seconds to wait for a writer's lock")
    sql.add_argument("--csv", action="store_true")
    sql.set_defaults(func=cmd_sql)
    exp = sub.add_parser("export", parents=[roots], help="export a table or query to CSV/Parquet")
    exp.add_argument("what", help="table name (e.g. scan_metrics) or a SELECT statement")
    exp.add_argument("out")
    exp.add_argument("--db", default="")
    exp.add_argument("--wait", type=float, default=30.0)
    exp.set_defaults(func=cmd_export)
    pro = sub.add_parser(
        "propose",
        parents=[roots],
        help="candidate segments of one reference slice to relabel into the annotation (no annotation needed)",
    )
    pro.add_argument("dataset")
    pro.add_argument("--slice", type=int, default=None, metavar="Z",
                     help="slice of the region crop, 0 at its inferior end (default: the region's middle)")  # fmt: skip
    pro.set_defaults(func=cmd_propose)
    rep = sub.add_parser(
        "report", parents=[roots], help="write a dataset's cohort report (HTML, CSV, XLSX); print its path"
    )
    rep.add_argument("dataset")
    rep.set_defaults(func=cmd_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _set_roots(args)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:  # Ctrl-C: the runs so far are recorded as they ended; no traceback
        print("\nnnsam2: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
