"""Process life: a worker whose parent died must not live on as an orphan, nor leave its run STARTED.

When the process that launched a run is killed (``kill -9`` of ``dagster job execute``), its step workers
are reparented to PID 1. Some finish their step and then hang, holding files and the GPU; others fail on
the broken pipe to their parent and exit. ``exit_with_parent`` covers both: a thread notices the new parent
within a second, and an exit hook catches a worker that is already on its way out. Either runs the
callback once (the Dagster layer marks the run failed); the thread then exits the process at once.
"""

from __future__ import annotations

import atexit
import os
import threading
from collections.abc import Callable

ORPHAN_EXIT_CODE = 70
_lock = threading.Lock()
_state = {"watched": False, "reported": False}


def exit_with_parent(on_orphaned: Callable[[], None] = lambda: None, poll_s: float = 0.5) -> bool:
    """Start (once per process) the watch on the current parent. False if already an orphan or watched."""
    parent = os.getppid()
    with _lock:
        if _state["watched"] or parent == 1:
            return False
        _state["watched"] = True

    def report_once() -> None:
        with _lock:
            if _state["reported"] or os.getppid() == parent:
                return
            _state["reported"] = True
        on_orphaned()

    def watch() -> None:
        stop = threading.Event()
        while not stop.wait(poll_s):
            if os.getppid() != parent:
                try:
                    report_once()
                finally:
                    os._exit(ORPHAN_EXIT_CODE)

    atexit.register(report_once)
    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()
    return True
