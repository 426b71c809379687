"""The common layer under every stage: labels, imaging, storage, layout, the per-scan cache, mask clean-up
and previews. Dagster-free."""

from __future__ import annotations

from collections.abc import Callable

Log = Callable[[str], None]


def silent(_: str) -> None:
    """A ``Log`` that drops its messages."""
