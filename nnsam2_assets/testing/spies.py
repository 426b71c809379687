"""Spies on library calls, for tests of what the pipeline hands a library."""

from __future__ import annotations

from typing import TYPE_CHECKING

from nnsam2_assets.core import walker

if TYPE_CHECKING:
    import pytest


def record_walker_spacing(monkeypatch: pytest.MonkeyPatch) -> list:
    """Each random walk's ``spacing`` as scikit-image is called with it (``core.walker``), in call order."""
    seen: list = []
    real = walker.random_walker

    def recording(*args, **kwargs):
        seen.append(kwargs.get("spacing"))
        return real(*args, **kwargs)

    monkeypatch.setattr(walker, "random_walker", recording)
    return seen
