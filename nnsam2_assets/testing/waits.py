"""Waiting in tests without making the outcome depend on the machine's speed.

A test waits for a state (a partition registered, a run finished, a process gone), never for a duration.
``HANG_GUARD_S`` only turns a hang into a failure with a message; it is sized so that no slow or busy
machine reaches it while the awaited thing still makes progress (the whole suite takes under 30 minutes).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")
HANG_GUARD_S = 1800.0


class HangError(AssertionError):
    pass


def wait_for(predicate: Callable[[], T], what: str, interval: float = 1.0) -> T:
    """Poll ``predicate`` until it returns something truthy, and return that."""
    deadline = time.monotonic() + HANG_GUARD_S
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise HangError(f"no {what} after {HANG_GUARD_S:.0f} s: hung (a hang guard, not a speed target)")
