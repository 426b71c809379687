"""Which propagator makes the pseudo-labels, as plain values: the Dagster resource
(``defs.resources.PropagationSettings``) is its configuration schema, and code without Dagster (the direct
pipeline, benchmarks) builds one itself."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from nnsam2_assets.propagation.backends import build_propagator
from nnsam2_assets.propagation.base import Propagator
from nnsam2_assets.propagation.parallel import default_workers


@dataclass(frozen=True)
class PropagationConfig:
    """``backend="auto"`` picks SAM2 when a checkpoint is configured and the registration backend otherwise."""

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
        """What the propagated masks depend on besides data: backend, mask rules, config, weights (by content:
        a checkpoint copied or downloaded again, the same bytes, must not re-propagate every scan)."""
        backend = self.resolved_backend()
        if backend != "sam2":
            from nnsam2_assets.propagation.registration import BACKEND_IDENTITY

            return BACKEND_IDENTITY
        from nnsam2_assets.core.sam2_models import checkpoint_digest
        from nnsam2_assets.propagation.sam2 import MASKS_VERSION

        ckpt = Path(self.sam2_checkpoint)
        weights = checkpoint_digest(ckpt) if ckpt.is_file() else "missing"
        return f"sam2|{MASKS_VERSION}|{self.sam2_config}|{weights}|{self.sam2_image_size}"

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
