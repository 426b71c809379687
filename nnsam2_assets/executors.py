"""Which engine runs the steps of the code location's runs, chosen by ``NNSAM2_EXECUTOR`` when it loads.

``multiprocess`` (default): every step is a process forked from a server that has already imported the heavy
modules, on the machine of the run. ``celery``: every step is a task on a Celery broker (``dagster-celery``),
picked up by worker processes that may run on other machines; GPU steps carry the ``gpu`` queue tag
(``defs.automation.GPU_TAGS``), so a worker started on that queue alone, with concurrency 1 on a GPU
machine, serialises them while CPU workers take the rest. ``k8s``: every step is a Kubernetes pod
(``dagster_k8s.k8s_job_executor``), where GPU steps request ``nvidia.com/gpu`` through the same tags; the
image, namespace and volumes come from the instance's ``K8sRunLauncher`` (README, *Operating it*).
"""

from __future__ import annotations

import gc
import multiprocessing
import multiprocessing.forkserver
import os
import pkgutil
import sys
from collections.abc import Sequence
from pathlib import Path

import dagster as dg

from nnsam2_assets.refinement.nnunet._common import HEAVY_MODULES

EXECUTOR_ENV = "NNSAM2_EXECUTOR"
CELERY_BROKER_ENV = "NNSAM2_CELERY_BROKER"  # e.g. redis://127.0.0.1:6379/0; also the result backend
EXECUTORS = ("multiprocess", "celery", "k8s")
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


# jobs that neither train nor predict with nnU-Net: they run on the chain's engine
CHAIN_JOBS = ("dataset_job",)
# Dagster's multiprocess executor puts this first in every fork server's preload list
_DAGSTER_PRELOAD = "dagster._core.executor.multiprocess"


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


def k8s_executor() -> dg.ExecutorDefinition:
    """dagster-k8s's executor: a pod per step. It takes the job image, namespace, service account and volumes
    from the ``K8sRunLauncher`` the run was launched with, so this project adds only the GPU steps' tags."""
    from dagster_k8s import k8s_job_executor

    return k8s_job_executor


def _distributed_executor() -> dg.ExecutorDefinition | None:
    """The engine named by ``NNSAM2_EXECUTOR`` when it is not this machine's fork server."""
    kind = executor_kind()
    return celery_executor() if kind == "celery" else k8s_executor() if kind == "k8s" else None


def code_location_executor() -> dg.ExecutorDefinition:
    return _distributed_executor() or STEP_EXECUTOR


def job_executor(job_name: str) -> dg.ExecutorDefinition | None:
    """A job's own engine: the chain's lighter fork server for ``CHAIN_JOBS``, else the code location's."""
    if job_name not in CHAIN_JOBS:
        return None
    return _distributed_executor() or CHAIN_STEP_EXECUTOR


def step_server_preload(job_name: str) -> list[str]:
    """What the fork server of a run of ``job_name`` imports, in the order Dagster's executor passes it."""
    modules = CHAIN_PRELOADED_MODULES if job_name in CHAIN_JOBS else PRELOADED_MODULES
    return [_DAGSTER_PRELOAD, *modules]


def job_to_execute(argv: Sequence[str], process: object = None) -> str | None:
    """The job this process will execute, when it knows: ``dagster job execute -j NAME`` on its command line,
    or a run that a code server started in this process (how the UI's and the sensors' runs execute)."""
    if process is not None and (job_name := _code_server_run_job(process)) is not None:
        return job_name
    if list(argv[1:3]) != ["job", "execute"]:
        return None
    args = list(argv[3:])
    for i, arg in enumerate(args):
        if arg in ("-j", "--job") and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith("--job="):
            return arg.removeprefix("--job=")
    return None


def _code_server_run_job(process: object) -> str | None:
    """A code server runs each run in a spawned process whose target is Dagster's ``start_run_in_subprocess``
    with the job as its second argument; multiprocessing keeps both on the process object (private names,
    so anything unexpected means "not such a run")."""
    target = getattr(process, "_target", None)
    if getattr(target, "__qualname__", None) != "start_run_in_subprocess":
        return None
    args = getattr(process, "_args", None) or ()
    job_name = getattr(args[1], "job_name", None) if len(args) > 1 else None
    return job_name if isinstance(job_name, str) else None


def start_step_server_early(argv: Sequence[str], process: object = None) -> bool:
    """Start the run's step fork server now, while this process is still loading the code location.

    The server imports the same modules as the loading process (about 2.5 s of each on 2 cores), and the
    multiprocess executor would only start it once the run begins: started here, the two imports overlap on
    separate cores. Python keeps one fork server per process and reuses a running one, so the executor's
    own start finds it; the preload list is the one that executor passes, so the steps fork from the same
    imports. Only for a process that knows the job it executes (``job_to_execute``): a code server, the UI
    or a test that merely loads the definitions never starts one. The launcher's imports are then kept out
    of the cyclic garbage collector (``freeze_imported_objects``)."""
    job_name = job_to_execute(argv, process)
    if job_name is None or executor_kind() != "multiprocess":
        return False
    multiprocessing.get_context("forkserver").set_forkserver_preload(step_server_preload(job_name))
    multiprocessing.forkserver.ensure_running()
    freeze_imported_objects()
    return True


# nanobind counts its extension's objects still alive when the interpreter ends and prints "leaked
# instances" for each; a frozen object is never collected, so one of these frozen would print that at exit
_NANOBIND_EXTENSIONS = ("_duckdb",)


def freeze_imported_objects() -> bool:
    """Move every object alive now (Dagster's and this package's modules, classes and functions: the bulk of
    a launcher's heap) out of the cyclic garbage collector's reach (``gc.freeze``). They live as long as the
    process, yet every full collection walked them, and so did the final one at exit: in a launched run
    that was 0.5-1 s of a 6-8 s command (``bench.overhead``). Objects made later are collected as before.
    Nothing is frozen once a nanobind extension is imported (its module's objects would then count as
    leaked at exit); the launcher imports DuckDB only later, when it builds the definitions."""
    if any(name in sys.modules for name in _NANOBIND_EXTENSIONS):
        return False
    gc.freeze()
    return True
