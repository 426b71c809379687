"""Shared helpers of ``bench/run.py`` and the fault tests: tiny phantom datasets, scan hold-out, the Dagster
per-dataset chain and a Dagster-free "direct" path that mirrors the assets with the same lib functions."""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import pandas as pd

from nnsam2_assets.defs.resources import NnsamStorage, PropagationSettings, RefinementSettings

SMALL = {"shape_yx": (64, 64), "spacing": (3.2, 3.2, 4.0)}
# the same field of view at 1.28 mm: big enough that holding 20 scans' arrays at once would show in RSS
MEDIUM = {"shape_yx": (160, 160), "spacing": (1.28, 1.28, 4.0)}
from nnsam2_assets.defs.selections import PER_DATASET  # noqa: E402,F401


def write_tiny_dataset(
    data_root: Path, name: str, n_scans: int, seed: int = 0, kind: str = "dixon", grid: dict | None = None
) -> Path:
    """A small-grid phantom dataset (64x64 in-plane unless ``grid``) whose reference is scan 0 (so scans can
    be held out)."""
    from nnsam2_assets.lib.phantom import write_demo_dataset

    return write_demo_dataset(
        Path(data_root),
        name,
        kind,
        n_scans,
        seed,
        reference_index=0,
        annotate="top" if kind == "ct" else "middle",
        **(grid or SMALL),
    )


def _scan_files(folder: Path, scan_id: str) -> list[Path]:
    out = []
    for sub in ("scans", "experts"):
        out += sorted((folder / sub).glob(f"{scan_id}.nii.gz")) + sorted((folder / sub).glob(f"{scan_id}_*"))
    return out


def hide_scan(folder: Path, scan_id: str, aside: Path) -> None:
    """Take a scan out of a dataset folder (files and its regions.csv row) into ``aside``."""
    aside.mkdir(parents=True, exist_ok=True)
    for f in _scan_files(folder, scan_id):
        dest = aside / f.relative_to(folder)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(f), str(dest))
    regions = folder / "regions.csv"
    lines = regions.read_text().splitlines()
    keep = [ln for ln in lines if not ln.startswith(f"{scan_id},")]
    (aside / f"{scan_id}.regions").write_text("\n".join(ln for ln in lines if ln not in keep))
    regions.write_text("\n".join(keep) + "\n")


def restore_scan(folder: Path, scan_id: str, aside: Path) -> None:
    """Put a hidden scan back (the "new scan arrives" event)."""
    for f in sorted(p for p in aside.rglob("*") if p.is_file() and not p.name.endswith(".regions")):
        if f.name.startswith(f"{scan_id}.") or f.name.startswith(f"{scan_id}_"):
            dest = folder / f.relative_to(aside)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(f), str(dest))
    row = (aside / f"{scan_id}.regions").read_text().strip()
    (aside / f"{scan_id}.regions").unlink()
    regions = folder / "regions.csv"
    regions.write_text(regions.read_text().rstrip("\n") + "\n" + row + "\n")


def resources(data_root: Path, storage_root: Path, refinement: RefinementSettings | None = None) -> dict:
    from dagster_duckdb import DuckDBResource

    return {
        "storage": NnsamStorage(data_root=str(data_root), storage_root=str(storage_root)),
        "propagation": PropagationSettings(),
        "refinement": refinement or RefinementSettings(),
        "metrics_db": DuckDBResource(database=str(Path(storage_root) / "nnsam2.duckdb")),
    }


def register(instance: dg.DagsterInstance, names: list[str]) -> None:
    known = set(instance.get_dynamic_partitions("datasets"))
    new = [n for n in names if n not in known]
    if new:
        instance.add_dynamic_partitions("datasets", new)


@dataclass
class ChainRun:
    seconds: float
    result: dg.ExecuteInProcessResult


def run_selection(instance, res: dict, name: str | None, selection: list[str], assets=None) -> ChainRun:
    """One in-process Dagster run (``dg.materialize``) of ``selection`` for partition ``name``."""
    from nnsam2_assets.definitions import all_assets

    t0 = time.perf_counter()
    result = dg.materialize(
        assets if assets is not None else all_assets(),
        selection=selection,
        partition_key=name,
        instance=instance,
        resources=res,
        raise_on_error=False,
    )
    return ChainRun(time.perf_counter() - t0, result)


def step_durations(result) -> dict[str, float]:
    """Seconds per step from STEP_SUCCESS events."""
    out = {}
    for ev in result.all_events:
        if ev.event_type_value == "STEP_SUCCESS":
            out[ev.step_key] = ev.event_specific_data.duration_ms / 1000.0
    return out


def direct_chain(data_root: Path, storage_root: Path, name: str) -> dict:
    """The per-dataset chain (scans -> pseudo_labels) without Dagster: the same lib.dataset_steps calls the
    assets make, on the same files and per-scan caches, in one process. What the assets add on top (overlay
    PNGs, markdown tables, asset checks) is charged to Dagster in the ratio, so it is conservative."""
    from nnsam2_assets.lib import dataset_steps as steps
    from nnsam2_assets.lib.dataset import load_dataset
    from nnsam2_assets.lib.layout import DatasetLayout
    from nnsam2_assets.lib.pseudolabels import SelectionConfig

    spec = load_dataset(Path(data_root), name)
    layout = DatasetLayout(Path(storage_root), name)
    settings = PropagationSettings()
    ingest = steps.ingest_scans(spec, layout)
    steps.write_reference_annotation(spec, layout)
    steps.rank_dataset(spec, layout)
    steps.build_frame_stacks(spec, layout)
    steps.propagate_masks(spec, layout, settings.build, settings.identity())
    steps.select_pseudo_labels(spec, layout, SelectionConfig())
    return {"n_scans": len(ingest.good)}


def direct_cohort(
    data_root: Path, storage_root: Path, names: list[str], refinement: RefinementSettings
) -> dict[str, float]:
    """The whole graph without Dagster: every dataset's chain, the three pooled nnU-Net stages, then final
    masks, metrics and agreement per dataset written to DuckDB; the same lib calls the assets make.
    Returns seconds per part (the keys of ``materialize_cohort``'s timings)."""
    import duckdb

    from nnsam2_assets.lib import refinement as refine
    from nnsam2_assets.lib.dataset import load_dataset
    from nnsam2_assets.lib.dataset_metrics import agreement_with_experts, dataset_metrics
    from nnsam2_assets.lib.dataset_steps import ok_scans
    from nnsam2_assets.lib.layout import DatasetLayout
    from nnsam2_assets.lib.metrics_db import SCHEMA, replace_dataset_rows
    from nnsam2_assets.lib.pseudolabels import STAGE_RULES
    from nnsam2_assets.lib.qc import QCConfig

    timings: dict[str, float] = {}
    for name in names:
        t0 = time.perf_counter()
        direct_chain(data_root, storage_root, name)
        timings[f"datasets/{name}"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    specs = {n: load_dataset(Path(data_root), n) for n in names}
    layouts = {n: DatasetLayout(Path(storage_root), n) for n in names}
    pool = refine.Pool(
        layouts=layouts,
        n_classes={n: s.n_classes for n, s in specs.items()},
        scans={n: ok_scans(layouts[n]) for n in names},
    )
    profile, quiet = refinement.profile_obj(), (lambda _m: None)
    refine.run_stage1(pool, Path(storage_root), profile, log=quiet)
    for stage in ("stage2", "stage3"):
        refine.run_next_stage(stage, pool, Path(storage_root), profile, STAGE_RULES[stage], log=quiet)
    timings["models"] = time.perf_counter() - t0
    for name in names:
        t0 = time.perf_counter()
        layout = layouts[name]
        refine.make_final_masks(specs[name], layout, ok_scans(layout), Path(storage_root), "auto", log=quiet)
        result = dataset_metrics(specs[name], layout, Path(storage_root), QCConfig(), "direct")
        with duckdb.connect(str(Path(storage_root) / "nnsam2.duckdb")) as con:
            replace_dataset_rows(con, name, result.tables)
            rows = con.execute(f"SELECT * FROM {SCHEMA}.scan_metrics WHERE dataset = ?", [name]).df()
            table, _ = agreement_with_experts(rows, name, "direct")
            replace_dataset_rows(
                con, name, {"agreement": table if len(table) else pd.DataFrame(columns=["dataset"])}
            )
        timings[f"outputs/{name}"] = time.perf_counter() - t0
    return timings


def _status_mb(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return float(line.split()[1]) / 1024.0  # kB
    except OSError:
        pass
    return None


def peak_rss_mb() -> float:
    """Peak resident set size of this process since start or since ``reset_peak_rss`` (Linux VmHWM)."""
    hwm = _status_mb("VmHWM")
    if hwm is not None:
        return hwm
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def rss_mb() -> float:
    return _status_mb("VmRSS") or peak_rss_mb()


def reset_peak_rss() -> bool:
    """Start the peak-RSS high-water mark afresh (Linux >= 4.0: write 5 to /proc/self/clear_refs), so a run's
    peak is not masked by a transient peak while importing torch/SAM2/nnU-Net."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def dump(obj, path: Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(obj, indent=2, default=str))
