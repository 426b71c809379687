"""Dagster resources: where data and artefacts live, which propagation backend and nnU-Net profile to use.

Values come from environment variables through ``dg.EnvVar`` (the UI shows which variable set a value);
an unset variable falls back to the default path of ``core.layout``, so the code location loads with none
set. ``build_resources`` is the one way to make the resource set: definitions, tests and benchmarks call it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import dagster as dg
from dagster_duckdb import DuckDBResource

from nnsam2_assets.core import layout
from nnsam2_assets.core.lifecycle import exit_with_parent
from nnsam2_assets.executors import executor_kind
from nnsam2_assets.ingest.convention import DatasetSpec, load_dataset
from nnsam2_assets.propagation.backends import build_propagator
from nnsam2_assets.propagation.base import Propagator
from nnsam2_assets.propagation.parallel import default_workers
from nnsam2_assets.refinement.nnunet import Profile, get_profile

if TYPE_CHECKING:
    from nnsam2_assets.supervoxels.steps import SupervoxelMethod

SAM2_CHECKPOINT_ENV = "NNSAM2_SAM2_CHECKPOINT"
# the nnU-Net recipe of RefinementSettings: a profile name, and epoch / iteration counts overriding it
NNUNET_PROFILE_ENV = "NNSAM2_NNUNET_PROFILE"
NNUNET_EPOCHS_ENV = "NNSAM2_NNUNET_EPOCHS"
NNUNET_ITERATIONS_ENV = "NNSAM2_NNUNET_ITERATIONS"
NNUNET_TRAINER_ENV = "NNSAM2_NNUNET_TRAINER"  # "plain" or "nnsam"
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
        # was killed marks the run failed itself and exits instead of hanging as an orphan
        # (a Celery worker outlives runs by design and its pool processes serve many: Celery watches those)
        run, instance = context.dagster_run, context.instance
        if run is not None and instance is not None and run.run_id and executor_kind() != "celery":
            exit_with_parent(lambda: mark_run_orphaned(instance, run.run_id))

    def layout(self, dataset: str) -> layout.DatasetLayout:
        return layout.DatasetLayout(self.root, dataset)


class PropagationSettings(dg.ConfigurableResource):
    """Which propagator makes the pseudo-labels.

    ``backend="auto"`` picks SAM2 when a checkpoint is configured and the registration backend otherwise.
    """

    backend: str = "auto"
    sam2_checkpoint: str = ""
    sam2_config: str = "configs/sam2.1/sam2.1_hiera_t.yaml"
    sam2_image_size: int = 512
    device: str = "auto"
    # processes that propagate a dataset's scans at once (registration backend); 0: NNSAM2_PROPAGATION_WORKERS
    # if set, else the core count
    workers: int = 0

    def worker_count(self) -> int:
        return self.workers or default_workers()

    def resolved_backend(self) -> str:
        if self.backend == "auto":
            return "sam2" if self.sam2_checkpoint else "registration"
        return self.backend

    def identity(self) -> str:
        """What the propagated masks depend on besides data: backend, config, weights (by size and mtime)."""
        backend = self.resolved_backend()
        if backend != "sam2":
            from nnsam2_assets.propagation.registration import BACKEND_IDENTITY

            return BACKEND_IDENTITY
        ckpt = Path(self.sam2_checkpoint)
        stamp = f"{ckpt.stat().st_size}:{int(ckpt.stat().st_mtime)}" if ckpt.is_file() else "missing"
        return f"sam2|{self.sam2_config}|{ckpt.name}|{stamp}|{self.sam2_image_size}"

    def supervoxel_method_id(self) -> str:
        """What the supervoxels depend on besides the data: SLIC and the chain, or SAM2's masks and model."""
        from nnsam2_assets.supervoxels.steps import slic_method

        if self.resolved_backend() == "sam2":
            return f"sam2|{self.identity()}"
        return slic_method().model_id

    def supervoxel_method(self) -> SupervoxelMethod:
        """SAM2's automatic masks carried by SAM2 when a checkpoint is configured, else SLIC carried by the
        registration chain. Builds the models (once per call)."""
        from nnsam2_assets.supervoxels import steps

        if self.resolved_backend() != "sam2":
            return steps.slic_method()
        from nnsam2_assets.supervoxels.automatic import AutomaticMaskGenerator

        generator = AutomaticMaskGenerator(
            self.sam2_config, self.sam2_checkpoint or None, self.sam2_image_size, self.device
        )
        return steps.sam2_method(generator, self.build, self.identity())

    def build(self) -> Propagator:
        backend = self.resolved_backend()
        if backend == "sam2":
            return build_propagator(
                "sam2",
                config=self.sam2_config,
                checkpoint=self.sam2_checkpoint or None,
                image_size=self.sam2_image_size,
                device=self.device,
            )
        return build_propagator(backend)


class RefinementSettings(dg.ConfigurableResource):
    """nnU-Net profile (``quick`` for CPU, ``paper`` for a GPU) and optional iteration overrides
    (``build_resources`` reads them from NNSAM2_NNUNET_PROFILE / _EPOCHS / _ITERATIONS when set)."""

    profile: str = "quick"
    num_epochs: int = 0  # 0 = profile default
    iterations_per_epoch: int = 0
    device: str = "auto"
    # "plain" nnU-Net, or "nnsam": a frozen SAM2 image encoder from ``sam2_checkpoint`` beside nnU-Net's and a
    # level-set shape head (the head alone when there is no checkpoint)
    trainer: str = "plain"
    level_set_weight: float = 0.1
    # build_resources gives them the propagation resource's checkpoint and its config (they must match)
    sam2_checkpoint: str = ""
    sam2_config: str = ""
    sam2_image_size: int = 256
    # benchmarks of nnSAM's plumbing only: a random-weight encoder when there is no checkpoint (the model's
    # record then names the encoder "...:random:<size>")
    sam2_random_weights: bool = False
    # where nnU-Net centres its foreground patches: uniformly inside the pseudo-labels, or on the dataset's
    # supervoxels (the ``supervoxels`` asset)
    foreground_sampling: str = "pseudo_labels"

    def profile_obj(self) -> Profile:
        overrides: dict = {"device": self.device, "foreground_sampling": self.foreground_sampling}
        if self.trainer != "plain":
            overrides.update(trainer=self.trainer, level_set_weight=self.level_set_weight,
                             sam2_checkpoint=self.sam2_checkpoint, sam2_config=self.sam2_config,
                             sam2_image_size=self.sam2_image_size,
                             sam2_random_weights=self.sam2_random_weights)  # fmt: skip
        if self.num_epochs:
            overrides["num_epochs"] = self.num_epochs
        if self.iterations_per_epoch:
            overrides["iterations_per_epoch"] = self.iterations_per_epoch
        return get_profile(self.profile, **overrides)


def resolved(resource: dg.ConfigurableResource) -> dg.ConfigurableResource:
    """The resource with its ``dg.EnvVar`` fields read, for code outside a Dagster run (the console, the CLI)."""
    return resource.process_config_and_initialize()


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
    propagation = propagation or PropagationSettings(sam2_checkpoint=env_or(SAM2_CHECKPOINT_ENV, ""))
    return {
        "storage": NnsamStorage(data_root=data, storage_root=storage),
        "propagation": propagation,
        "refinement": refinement
        or RefinementSettings(
            profile=env_or(NNUNET_PROFILE_ENV, "quick"),
            num_epochs=env_int_or(NNUNET_EPOCHS_ENV, 0),
            iterations_per_epoch=env_int_or(NNUNET_ITERATIONS_ENV, 0),
            trainer=env_or(NNUNET_TRAINER_ENV, "plain"),
            foreground_sampling=env_or(FOREGROUND_SAMPLING_ENV, "pseudo_labels"),
            sam2_checkpoint=propagation.sam2_checkpoint,
            sam2_config=propagation.sam2_config,
        ),
        "metrics_db": DuckDBResource(database=database),
    }


@dg.definitions
def defs() -> dg.Definitions:
    return dg.Definitions(resources=build_resources())
