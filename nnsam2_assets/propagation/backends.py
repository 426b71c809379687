"""The propagation backends by name: ``registration`` (SimpleITK, weight-free, the default) and ``sam2``."""

from __future__ import annotations

from nnsam2_assets.propagation.base import Propagator


def build_propagator(backend: str = "registration", **kwargs) -> Propagator:
    """Construct a backend by name; keyword arguments go to its constructor."""
    name = backend.lower()
    if name == "registration":
        from nnsam2_assets.propagation.registration import RegistrationPropagator

        return RegistrationPropagator(**kwargs)
    if name == "sam2":
        # Lazy on purpose: importing sam2 pulls in torch and hydra, which the default backend never needs.
        from nnsam2_assets.propagation.sam2 import SAM2Propagator

        return SAM2Propagator(**kwargs)
    raise ValueError(f"unknown propagation backend {backend!r} (expected 'registration' or 'sam2')")
