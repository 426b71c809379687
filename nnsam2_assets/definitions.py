"""The nnsam2 code location: everything under ``defs/`` (assets, checks, sensors, schedules, jobs, resources),
run on the multiprocess executor (forkserver, heavy modules preloaded)."""

from __future__ import annotations

import pkgutil
from pathlib import Path

import dagster as dg

from nnsam2_assets.refinement.nnunet._common import HEAVY_MODULES


@dg.definitions
def defs() -> dg.Definitions:
    return dg.Definitions.merge(
        dg.load_from_defs_folder(path_within_project=Path(__file__).parent),
        dg.Definitions(executor=STEP_EXECUTOR),
    )


# Each step is its own process (a crashing step fails alone, and GPU memory is freed between steps), forked
# from a server that has already imported the heavy modules: a step starts in well under a second instead of
# re-importing dagster, torch, nnunetv2 and SimpleITK for 5-15 s. CUDA is never initialised in the
# server (importing torch does not), so forked steps may still use the GPU.
PRELOADED_MODULES = [
    *(f"{__package__}.defs.{m.name}" for m in pkgutil.iter_modules([str(Path(__file__).parent / "defs")])),
    *HEAVY_MODULES,
]
STEP_EXECUTOR = dg.multiprocess_executor.configured(
    {"max_concurrent": 2, "start_method": {"forkserver": {"preload_modules": PRELOADED_MODULES}}}
)


def all_assets() -> list:
    """Every asset of the code location (for in-process ``dg.materialize`` runs)."""
    return list(defs().assets or [])
