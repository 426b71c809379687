"""Dagster resources: where data and artefacts live, which propagation backend and nnU-Net profile to use.

Values come from environment variables through ``dg.EnvVar`` (the UI shows which variable set a value);
an unset variable falls back to the default path of ``core.layout``, so the code location loads with none
set. ``build_resources`` is the one way to make the resource set: definitions, tests and benchmarks call it.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
from pathlib import Path
from typing import Any, TypeVar

import dagster as dg
from dagster_duckdb import DuckDBResource

from nnsam2_assets.core import layout
from nnsam2_assets.core.lifecycle import exit_with_parent
from nnsam2_assets.executors import executor_kind
from nnsam2_assets.ingest.convention import DatasetSpec, load_dataset
from nnsam2_assets.propagation.parallel import default_workers
from nnsam2_assets.propagation.settings import PropagationConfig
from nnsam2_assets.refinement.nnunet import Profile
from nnsam2_assets.refinement.settings import RefinementConfig

T = TypeVar("T")

SAM2_CHECKPOINT_ENV = "NNSAM2_SAM2_CHECKPOINT"
# the checkpoint's model config (e.g. configs/sam2.1/sam2.1_hiera_l.yaml) and the frames' side in pixels (the
# weights were trained at 1024)
SAM2_CONFIG_ENV = "NNSAM2_SAM2_CONFIG"
SAM2_IMAGE_SIZE_ENV = "NNSAM2_SAM2_IMAGE_SIZE"
# the nnU-Net recipe of RefinementSettings: a profile name, and epoch / iteration counts overriding it
NNUNET_PROFILE_ENV = "NNSAM2_NNUNET_PROFILE"
NNUNET_EPOCHS_ENV = "NNSAM2_NNUNET_EPOCHS"
NNUNET_ITERATIONS_ENV = "NNSAM2_NNUNET_ITERATIONS"
NNUNET_TRAINER_ENV = "NNSAM2_NNUNET_TRAINER"  # "plain" or "nnsam"
NNUNET_BASE_FEATURES_ENV = "NNSAM2_NNUNET_BASE_FEATURES"  # the 2d network's first width, e.g. 16
NNUNET_SEED_ENV = "NNSAM2_NNUNET_SEED"  # the nnU-Net stages' training seed (0, the default, or another)
NNUNET_WARM_START_ENV = "NNSAM2_NNUNET_WARM_START_EPOCHS"  # stages 2-3 from the previous weights, N epochs
FOREGROUND_SAMPLING_ENV = "NNSAM2_FOREGROUND_SAMPLING"  # "pseudo_labels" or "supervoxels"


def env_or(name: str, default: str) -> str:
    """``dg.EnvVar(name)`` when the variable is set, else ``default``."""
    return dg.EnvVar(name) if os.environ.get(name) else default


def env_int_or(name: str, default: int) -> int:
    """``dg.EnvVar.int(name)`` when the variable is set, else ``default``."""
    return dg.EnvVar.int(name) if os.environ.get(name) else default


def mark_run_orphaned(instance: dg.DagsterInstance, run_id: str) -> None:
    """Fail a run whose launcher died, and give back its pool slots: without a daemon nobody else frees
    them, and every later run would wait for the GPU pool forever."""
    run = instance.get_run_by_id(run_id)
    if run is not None and not run.is_finished:
        instance.report_run_failed(run, "the process that launched this run died; its step workers stopped")
    instance.event_log_storage.free_concurrency_slots_for_run(run_id)


class NnsamStorage(dg.ConfigurableResource):
    """The data root (one folder per dataset) and the storage root for artefacts (atomic files)."""

    data_root: str
    storage_root: str

    @property
    def data(self) -> Path:
        return Path(self.data_root).resolve()

    @property
    def root(self) -> Path:
        return Path(self.storage_root).resolve()

    def dataset(self, name: str) -> DatasetSpec:
        return load_dataset(self.data, name)

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        # DefaultRunLauncher reports no worker health to run monitoring, so a step worker whose run process
        # was killed marks the run failed itself and exits instead of hanging as an orphan. Only a step
        # worker: an in-process run (``nnsam2 run``, ``dg.materialize``) would watch the user's shell, and
        # ``nohup nnsam2 run &`` would die with it (a Celery worker outlives runs by design and its pool
        # processes serve many: Celery watches those)
        run, instance = context.dagster_run, context.instance
        if (
            run is not None
            and instance is not None
            and run.run_id
            and multiprocessing.parent_process() is not None
            and executor_kind() != "celery"
        ):
            exit_with_parent(lambda: mark_run_orphaned(instance, run.run_id))

    def layout(self, dataset: str) -> layout.DatasetLayout:
        return layout.DatasetLayout(self.root, dataset)


class PropagationSettings(dg.ConfigurableResource):
    """Which propagator makes the pseudo-labels: ``propagation.settings.PropagationConfig``'s fields as
    run configuration (the UI shows and edits them); ``config()`` is the value the domain code takes."""

    backend: str = PropagationConfig.backend
    sam2_checkpoint: str = PropagationConfig.sam2_checkpoint
    sam2_config: str = PropagationConfig.sam2_config
    sam2_image_size: int = PropagationConfig.sam2_image_size
    device: str = PropagationConfig.device
    workers: int = PropagationConfig.workers

    def config(self) -> PropagationConfig:
        return _as_dataclass(self, PropagationConfig)


class RefinementSettings(dg.ConfigurableResource):
    """The nnU-Net recipe: ``refinement.settings.RefinementConfig``'s fields as run configuration
    (``build_resources`` reads them from NNSAM2_NNUNET_PROFILE / _EPOCHS / _ITERATIONS / _TRAINER /
    _BASE_FEATURES / _SEED / _WARM_START_EPOCHS and
    NNSAM2_FOREGROUND_SAMPLING when set); ``config()`` is the value the domain code takes."""

    profile: str = RefinementConfig.profile
    num_epochs: int = RefinementConfig.num_epochs
    iterations_per_epoch: int = RefinementConfig.iterations_per_epoch
    device: str = RefinementConfig.device
    trainer: str = RefinementConfig.trainer
    level_set_weight: float = RefinementConfig.level_set_weight
    sam2_checkpoint: str = RefinementConfig.sam2_checkpoint
    sam2_config: str = RefinementConfig.sam2_config
    sam2_image_size: int = RefinementConfig.sam2_image_size
    sam2_random_weights: bool = RefinementConfig.sam2_random_weights
    foreground_sampling: str = RefinementConfig.foreground_sampling
    base_features: int = RefinementConfig.base_features
    training_seed: int = RefinementConfig.training_seed
    warm_start_epochs: int = RefinementConfig.warm_start_epochs

    def config(self) -> RefinementConfig:
        return _as_dataclass(self, RefinementConfig)

    def profile_for(self, propagation: PropagationSettings) -> Profile:
        """The recipe the stages train with. nnSAM's encoder is the propagation resource's SAM2 checkpoint
        unless this resource names its own: one set on ``propagation`` in the launchpad had reached only the
        propagation, and nnSAM quietly trained its shape head alone."""
        config = self.config()
        config = dataclasses.replace(
            config,
            sam2_checkpoint=config.sam2_checkpoint or propagation.sam2_checkpoint,
            sam2_config=config.sam2_config or propagation.sam2_config,
        )
        return config.profile_obj()


def _as_dataclass(resource: dg.ConfigurableResource, cls: type[T]) -> T:
    """The resource's fields as the domain dataclass of the same field names (a field the dataclass lacks,
    or one the resource lacks, is an error here rather than a silently dropped setting)."""
    names = {f.name for f in dataclasses.fields(cls)}
    if names != set(type(resource).model_fields):
        raise TypeError(f"{type(resource).__name__} and {cls.__name__} name different settings")
    return cls(**{name: getattr(resource, name) for name in names})


def resolved(resource: dg.ConfigurableResource) -> dg.ConfigurableResource:
    """The resource with its ``dg.EnvVar`` fields read, for code outside a Dagster run (the console, the CLI)."""
    return resource.process_config_and_initialize()


# the new-data sensor's pace (defs/sensors.py), read when the code location loads; a bad value is refused
# (``settings_problem`` asks before a run, and the code location fails to load with it)
MAX_RUNS_PER_TICK_ENV = "NNSAM2_MAX_RUNS_PER_TICK"
DEFAULT_MAX_RUNS_PER_TICK = 2


SENSOR_INTERVAL_ENV = "NNSAM2_SENSOR_INTERVAL_S"
DEFAULT_SENSOR_INTERVAL_S = 30


def sensor_interval_s() -> int:
    """How often new_data_sensor looks at the data root: a slow network share wants longer, a demo shorter.
    Read when the code location loads."""
    return layout.env_whole_number(SENSOR_INTERVAL_ENV, DEFAULT_SENSOR_INTERVAL_S)


def max_runs_per_tick() -> int:
    return layout.env_whole_number(MAX_RUNS_PER_TICK_ENV, DEFAULT_MAX_RUNS_PER_TICK)


def settings_problem() -> str | None:
    """What the environment's settings get wrong, as one line naming the setting; None when all are valid.
    Asked before a long run starts: a typo in ``NNSAM2_NNUNET_PROFILE`` used to surface after every dataset
    was ingested and propagated, as a traceback."""
    try:
        executor_kind()
        default_workers()
        sensor_interval_s()
        max_runs_per_tick()
        resources = build_resources()
        resolved(resources["storage"])
        propagation = resolved(resources["propagation"])
        propagation.config()
        checkpoint = propagation.sam2_checkpoint
        if checkpoint and not Path(checkpoint).is_file():  # else every dataset failed at propagation
            return f"the SAM2 checkpoint {checkpoint} ({SAM2_CHECKPOINT_ENV} or the propagation resource) is not a file"
        if checkpoint and (problem := _sam2_model_problem(propagation)):
            return problem
        resolved(resources["refinement"]).profile_for(propagation)
    except dg.DagsterInvalidConfigError as exc:
        return "; ".join(_config_error_line(error) for error in exc.errors) or str(exc).splitlines()[0]
    except KeyError as exc:
        return str(exc.args[0]) if exc.args else repr(exc)
    except (ValueError, TypeError) as exc:
        return str(exc)
    return None


def _sam2_model_problem(propagation: PropagationSettings) -> str | None:
    """A SAM2 model config the sam2 package does not ship, or a frame size it cannot take: either failed
    every dataset's propagation after its ingest."""
    from importlib.util import find_spec

    spec = find_spec("sam2")  # not imported: its import sets up Hydra, which the SAM2 backend does itself
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    if not any((Path(folder) / propagation.sam2_config).is_file() for folder in folders):
        return (
            f"the SAM2 config {propagation.sam2_config!r} ({SAM2_CONFIG_ENV} or the propagation resource) is not "
            "one the sam2 package ships (e.g. configs/sam2.1/sam2.1_hiera_l.yaml)"
        )
    from nnsam2_assets.core.sam2_models import checked_image_size

    try:
        checked_image_size(propagation.sam2_image_size)
    except ValueError as exc:
        return f"the SAM2 image size ({SAM2_IMAGE_SIZE_ENV} or the propagation resource): {exc}"
    return None


def _config_error_line(error: Any) -> str:
    """Dagster's message for one invalid config value, without its exception class and stack trace."""
    text = (error.error_data.message if error.error_data is not None else error.message).strip()
    first = text.splitlines()[0]
    return first.split("Error: ", 1)[1] if "Error: " in first else first


def build_resources(
    data_root: Path | None = None,
    storage_root: Path | None = None,
    refinement: RefinementSettings | None = None,
    propagation: PropagationSettings | None = None,
) -> dict[str, dg.ConfigurableResource]:
    """The platform's resources. Explicit roots (tests, benchmarks) win; otherwise the environment
    variables of ``core.layout``, else its default paths."""
    if storage_root is not None:
        storage, database = str(storage_root), str(layout.duckdb_path(Path(storage_root)))
    else:
        storage = env_or(layout.STORAGE_ROOT_ENV, str(layout.storage_root()))
        database = env_or(layout.DUCKDB_ENV, str(layout.duckdb_path()))
    data = str(data_root) if data_root is not None else env_or(layout.DATA_ROOT_ENV, str(layout.data_root()))
    propagation = propagation or PropagationSettings(
        sam2_checkpoint=env_or(SAM2_CHECKPOINT_ENV, ""),
        sam2_config=env_or(SAM2_CONFIG_ENV, PropagationConfig.sam2_config),
        sam2_image_size=env_int_or(SAM2_IMAGE_SIZE_ENV, PropagationConfig.sam2_image_size),
    )
    return {
        "storage": NnsamStorage(data_root=data, storage_root=storage),
        "propagation": propagation,
        "refinement": refinement
        or RefinementSettings(
            profile=env_or(NNUNET_PROFILE_ENV, "quick"),
            num_epochs=env_int_or(NNUNET_EPOCHS_ENV, 0),
            iterations_per_epoch=env_int_or(NNUNET_ITERATIONS_ENV, 0),
            trainer=env_or(NNUNET_TRAINER_ENV, "plain"),
            base_features=env_int_or(NNUNET_BASE_FEATURES_ENV, 0),
            training_seed=env_int_or(NNUNET_SEED_ENV, 0),
            warm_start_epochs=env_int_or(NNUNET_WARM_START_ENV, 0),
            foreground_sampling=env_or(FOREGROUND_SAMPLING_ENV, "pseudo_labels"),
        ),  # nnSAM's SAM2 checkpoint and config: the propagation resource's, as run (``profile_for``)
        "metrics_db": DuckDBResource(database=database),
    }


@dg.definitions
def defs() -> dg.Definitions:
    return dg.Definitions(resources=build_resources())
