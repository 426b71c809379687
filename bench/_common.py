"""Shared helpers of the benchmark sections: result rows, scratch folders with their own Dagster instance,
in-process runs of a selection, step timings, memory readings and the machine's description."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import dagster as dg

from nnsam2_assets.definitions import all_assets
from nnsam2_assets.metrics.store import SCHEMA, query
from nnsam2_assets.testing.machine import cpu_model

__all__ = ["all_assets", "cpu_model"]


def row(name: str, ratio, target: str, ok, detail: str, **extra) -> dict:
    return {"row": name, "ratio": ratio, "target": target, "ok": ok, "detail": detail, **extra}


class Workdir:
    """A scratch folder with its own Dagster instance (sqlite) for one bench section."""

    def __init__(self, base: Path, name: str):
        self.path = base / name
        self.data = self.path / "data"
        (self.path / "home").mkdir(parents=True, exist_ok=True)
        self._ctx = dg.instance_for_test(temp_dir=str(self.path / "home"))
        self.instance = self._ctx.__enter__()

    def storage(self, tag: str = "storage") -> Path:
        return self.path / tag

    def close(self) -> None:
        self._ctx.__exit__(None, None, None)


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


def row_counts(db: Path) -> dict[str, int]:
    """Rows per table of the metrics schema (none before any metrics were written)."""
    if not db.exists():
        return {}
    tables = query(db, f"SELECT table_name FROM information_schema.tables WHERE table_schema = '{SCHEMA}'")
    return {
        t: int(query(db, f"SELECT count(*) AS n FROM {SCHEMA}.{t}").n.iloc[0])
        for t in sorted(tables.table_name)
    }


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
