"""Fresh-process worker of the peak-memory bench (``python -m bench.rss_child DATA STORAGE NAME``): materialize one partition's per-dataset chain in-process (propagation
too, on one worker) and print one JSON line with its wall time and the peak RSS during that run (so runs of different sizes compare)."""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path


def main(argv: list[str]) -> int:
    import dagster as dg

    from bench._common import peak_rss_mb, register, reset_peak_rss, rss_mb, run_selection
    from nnsam2_assets.defs.resources import PropagationSettings, build_resources
    from nnsam2_assets.pipeline import PER_DATASET
    from nnsam2_assets.testing.cohorts import write_tiny_dataset

    data_root, storage_root, name = Path(argv[0]), Path(argv[1]), argv[2]
    # one propagation worker: the scans propagate in this process, whose high-water mark is what is read
    # (worker processes, the default on more than one core, would take their memory out of the measure)
    in_process = PropagationSettings(workers=1)
    import_peak = peak_rss_mb()
    with (
        tempfile.TemporaryDirectory(prefix="nnsam2-bench-home-") as home,
        dg.instance_for_test(temp_dir=home) as instance,
    ):
        # warm-up on a one-scan dataset: the first run maps ITK's registration code, fills Dagster's
        # storage, ... (~250 MB here) whatever the data size; that one-off cost would mask the data's share
        warm = Path(home) / "warm"
        write_tiny_dataset(warm / "data", "warm", 1, seed=99)
        register(instance, ["warm"])
        warm_resources = build_resources(warm / "data", warm / "storage", propagation=in_process)
        assert run_selection(instance, warm_resources, "warm", PER_DATASET).result.success
        base_rss = rss_mb()  # after imports and the warm-up
        reset = reset_peak_rss()
        register(instance, [name])
        t0 = time.perf_counter()
        resources = build_resources(data_root, storage_root, propagation=in_process)
        run = run_selection(instance, resources, name, PER_DATASET)
        seconds = time.perf_counter() - t0
    print(
        json.dumps(
            {
                "success": run.result.success,
                "seconds": seconds,
                "peak_rss_mb": peak_rss_mb(),
                "rss_after_imports_mb": base_rss,
                "import_peak_mb": import_peak,
                "peak_was_reset": reset,
            }
        )
    )
    return 0 if run.result.success else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
