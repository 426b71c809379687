"""Propagating the scans of a dataset in worker processes, for backends whose result depends on nothing but
the inputs (``Propagator.parallel_safe``: the registration backend, single-threaded in each worker, so the
masks are bit-identical to a serial run). SAM2 stays in the parent: one model build per run.

The workers only compute; the parent writes every file and keeps the cache, so a parallel run leaves
exactly what a serial one does.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from nnsam2_assets.core.imaging import read_image
from nnsam2_assets.core.layout import env_whole_number
from nnsam2_assets.propagation.base import PropagationResult, Propagator
from nnsam2_assets.propagation.prompts import propagate_from_slices

WORKERS_ENV = "NNSAM2_PROPAGATION_WORKERS"
# fork on Linux: a worker starts at once with the modules already imported. Spawn re-imports the caller's
# main module in every worker (bench.run or the dagster CLI: torch, nnunetv2, ...), ~10 s that ate the whole
# speed-up on 8 scans. The workers run only ITK and numpy and talk only through their pool's pipes, so the
# caller's threads (a Dagster step has some) hold nothing they need.
START_METHOD = "fork" if sys.platform.startswith("linux") else "spawn"
_job: dict = {}


def default_workers() -> int:
    """``NNSAM2_PROPAGATION_WORKERS`` if set (a whole number, 1 or more), else the core count."""
    return env_whole_number(WORKERS_ENV, max(1, os.cpu_count() or 1), "a whole number of worker processes")


def _start(
    propagator: Propagator, reference: Path, annotation: Path, prompts: Sequence[int], modality: str
) -> None:
    _job.update(
        propagator=propagator,
        reference=read_image(reference),
        annotation=read_image(annotation),
        prompts=prompts,
        modality=modality,
    )


def _propagate_or_none(target: Path) -> PropagationResult | None:
    """The target's result, or None where it failed here: no exception object crosses back (one that cannot
    be unpickled broke the whole pool, and a worker still sending its result then blocked for ever)."""
    try:
        return _propagate(target)
    except Exception:  # the caller propagates this target again in its own process, where its error is told
        return None


def _propagate(target: Path) -> PropagationResult:
    return propagate_from_slices(
        _job["propagator"],
        _job["reference"],
        _job["annotation"],
        _job["prompts"],
        read_image(target),
        _job["modality"],
    )


def propagate_in_workers(
    propagator: Propagator,
    reference: Path,
    annotation: Path,
    prompts: Sequence[int],
    modality: str,
    targets: dict[str, Path],
    workers: int,
) -> dict[str, PropagationResult]:
    """{scan: result} for the targets ``workers`` processes (``START_METHOD``) propagated. A target whose
    propagation failed there (its own error, or a worker killed for memory) is left out: the caller
    propagates it in its own process, where its error is that scan's alone."""
    with ProcessPoolExecutor(
        workers,
        mp_context=multiprocessing.get_context(START_METHOD),
        initializer=_start,
        initargs=(propagator, reference, annotation, prompts, modality),
    ) as pool:
        futures = {scan: pool.submit(_propagate_or_none, path) for scan, path in targets.items()}
        outcomes = {
            scan: future.result() if future.exception() is None else None for scan, future in futures.items()
        }
    return {scan: result for scan, result in outcomes.items() if result is not None}
