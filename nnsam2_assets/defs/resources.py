"""Dagster resources: where data and artefacts live, which propagation backend and nnU-Net profile to use."""

from __future__ import annotations

from pathlib import Path

import dagster as dg

from nnsam2_assets import settings
from nnsam2_assets.lib.dataset import DatasetSpec, load_dataset


class NnsamStorage(dg.ConfigurableResource):
    """The data root (one folder per dataset) and the storage root for artefacts (atomic files)."""

    data_root: str = ""
    storage_root: str = ""
    duckdb_file: str = ""  # default: <storage_root>/nnsam2.duckdb (never named like its schema)

    @property
    def data(self) -> Path:
        return Path(self.data_root).resolve() if self.data_root else settings.data_root()

    @property
    def root(self) -> Path:
        return Path(self.storage_root).resolve() if self.storage_root else settings.storage_root()

    @property
    def duckdb(self) -> Path:
        if self.duckdb_file:
            return Path(self.duckdb_file).resolve()
        return self.root / "nnsam2.duckdb" if self.storage_root else settings.duckdb_path()

    def dataset(self, name: str) -> DatasetSpec:
        return load_dataset(self.data, name)

    def asset_dir(self, dataset: str, asset: str) -> Path:
        return self.root / "datasets" / dataset / asset

    def model_dir(self, stage: str) -> Path:
        return self.root / "models" / stage


class PropagationSettings(dg.ConfigurableResource):
    """Which propagator makes the pseudo-labels.

    ``backend="auto"`` picks SAM2 when a checkpoint is configured and the registration backend otherwise.
    """

    backend: str = "auto"
    sam2_checkpoint: str = ""
    sam2_config: str = "configs/sam2.1/sam2.1_hiera_t.yaml"
    sam2_image_size: int = 512
    device: str = "auto"

    def resolved_backend(self) -> str:
        if self.backend == "auto":
            return "sam2" if self.sam2_checkpoint else "registration"
        return self.backend

    def identity(self) -> str:
        """What the propagated masks depend on besides data: backend, config, weights (by size and mtime)."""
        backend = self.resolved_backend()
        if backend != "sam2":
            return backend
        ckpt = Path(self.sam2_checkpoint)
        stamp = f"{ckpt.stat().st_size}:{int(ckpt.stat().st_mtime)}" if ckpt.is_file() else "missing"
        return f"sam2|{self.sam2_config}|{ckpt.name}|{stamp}|{self.sam2_image_size}"

    def build(self):
        from nnsam2_assets.lib.propagation.base import build_propagator

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
    """nnU-Net profile (``quick`` for CPU, ``paper`` for a GPU) and optional iteration overrides."""

    profile: str = "quick"
    num_epochs: int = 0  # 0 = profile default
    iterations_per_epoch: int = 0
    device: str = "auto"

    def profile_obj(self):
        from nnsam2_assets.lib.nnunet import get_profile

        overrides: dict = {"device": self.device}
        if self.num_epochs:
            overrides["num_epochs"] = self.num_epochs
        if self.iterations_per_epoch:
            overrides["iterations_per_epoch"] = self.iterations_per_epoch
        return get_profile(self.profile, **overrides)
