"""Which engine runs the steps of the code location's runs, chosen by ``NNSAM2_EXECUTOR`` when it loads.

``multiprocess`` (default): every step is a process forked from a server that has already imported the heavy
modules, on the machine of the run. ``celery``: every step is a task on a Celery broker (``dagster-celery``),
picked up by worker processes that may run on other machines; GPU steps carry the ``gpu`` queue tag
(``defs.automation.GPU_TAGS``), so a worker started on that queue alone, with concurrency 1 on a GPU
machine, serialises them while CPU workers take the rest. Kubernetes (``dagster_k8s.k8s_job_executor``)
is configured in the deployment, not here (README, *Operating it*).
"""

from __future__ import annotations

import os
import pkgutil
from pathlib import Path

import dagster as dg

from nnsam2_assets.refinement.nnunet._common import HEAVY_MODULES

EXECUTOR_ENV = "NNSAM2_EXECUTOR"
CELERY_BROKER_ENV = "NNSAM2_CELERY_BROKER"  # e.g. redis://127.0.0.1:6379/0; also the result backend
EXECUTORS = ("multiprocess", "celery")
CPU_QUEUE, GPU_QUEUE = "dagster", "gpu"  # dagster-celery's default queue, and the GPU steps' queue

# Each step is its own process (a crashing step fails alone, and GPU memory is freed between steps), forked
# from a server that has already imported the heavy modules: a step starts in well under a second instead of
# re-importing dagster, torch, nnunetv2 and SimpleITK for 5-15 s. CUDA is never initialised in the
# server (importing torch does not), so forked steps may still use the GPU.
PRELOADED_MODULES = [
    *(f"{__package__}.defs.{m.name}" for m in pkgutil.iter_modules([str(Path(__file__).parent / "defs")])),
    *HEAVY_MODULES,
    f"{__package__}.step_preload",  # Dagster's storage layer and the built definitions
]
STEP_EXECUTOR = dg.multiprocess_executor.configured(
    {"max_concurrent": 2, "start_method": {"forkserver": {"preload_modules": PRELOADED_MODULES}}}
)
# The per-dataset chain (ingest to pseudo-labels) neither trains nor predicts with nnU-Net, so its fork server
# leaves nnU-Net and torch out (about 3 s of each run's start on 2 cores); with the SAM2 backend the
# propagation step imports torch itself, once, as the server would have.
CHAIN_PRELOADED_MODULES = [m for m in PRELOADED_MODULES if m not in HEAVY_MODULES]
CHAIN_STEP_EXECUTOR = dg.multiprocess_executor.configured(
    {"max_concurrent": 2, "start_method": {"forkserver": {"preload_modules": CHAIN_PRELOADED_MODULES}}},
    name="chain_multiprocess",
)


def executor_kind() -> str:
    kind = os.environ.get(EXECUTOR_ENV, "").strip() or "multiprocess"
    if kind not in EXECUTORS:
        raise ValueError(f"{EXECUTOR_ENV}={kind!r}: choose one of {', '.join(EXECUTORS)}")
    return kind


def celery_executor() -> dg.ExecutorDefinition:
    """dagster-celery's executor on the broker named by ``NNSAM2_CELERY_BROKER`` (read when a run starts, so a
    missing variable fails that run with its name), which also holds the task results."""
    from dagster_celery import celery_executor as dagster_celery_executor

    broker = {"env": CELERY_BROKER_ENV}
    return dagster_celery_executor.configured({"broker": broker, "backend": broker})


def code_location_executor() -> dg.ExecutorDefinition:
    return celery_executor() if executor_kind() == "celery" else STEP_EXECUTOR


def chain_executor() -> dg.ExecutorDefinition:
    """The per-dataset chain's engine: the same choice, with a lighter fork server."""
    return celery_executor() if executor_kind() == "celery" else CHAIN_STEP_EXECUTOR
