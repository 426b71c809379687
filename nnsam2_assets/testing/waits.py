"""Waiting in tests without making the outcome depend on the machine's speed.

A test waits for a state (a partition registered, a run finished, a process gone), never for a duration,
and with no deadline: a predicate fails at once when what it waits on has died (a process that exited, a
server that stopped), and a true hang is left to the CI job's own limit.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_for(predicate: Callable[[], T], what: str, interval: float = 1.0) -> T:
    """Poll ``predicate`` until it returns something truthy, and return that. ``what`` names the state in
    the predicate's own failures; the wait itself has no deadline."""
    while not (value := predicate()):
        time.sleep(interval)
    return value
