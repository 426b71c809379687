"""Process life: a worker whose parent died must not live on as an orphan, nor leave its run STARTED.

When the process that launched a run is killed (``kill -9`` of ``dagster job execute``), its step workers
lose their launcher (spawned ones are reparented to PID 1; forked ones keep the fork server as parent).
Some finish their step and then hang, holding files and the GPU; others fail on the broken pipe to their
parent and exit. ``exit_with_parent`` covers both: a thread notices the launcher is gone within a second,
and an exit hook catches a worker that is already on its way out. Either runs the callback once (the
Dagster layer marks the run failed); the thread then exits the process at once.

``stop_session`` is the other half: stopping ``dagster dev`` must stop everything it started, including
code servers and run workers that its own shutdown leaves behind.
"""

from __future__ import annotations

import atexit
import contextlib
import multiprocessing
import multiprocessing.util
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

ORPHAN_EXIT_CODE = 70
_lock = threading.Lock()
_state = {"watched": False, "reported": False}


def _launcher_alive() -> Callable[[], bool] | None:
    """Whether the process that launched this one still lives; None when that is already PID 1.

    A multiprocessing child asks its ``parent_process()``: the process that started it, which for a
    forkserver child is the executor that asked for the fork, not the fork server that is its OS parent
    (and that may outlive the executor). Anything else watches its OS parent."""
    launcher = multiprocessing.parent_process()
    if launcher is not None:
        return launcher.is_alive
    parent = os.getppid()
    return None if parent == 1 else lambda: os.getppid() == parent


def exit_with_parent(on_orphaned: Callable[[], None] = lambda: None, poll_s: float = 0.5) -> bool:
    """Start (once per process) the watch on the launching process. False if already an orphan or watched."""
    alive = _launcher_alive()
    with _lock:
        if _state["watched"] or alive is None:
            return False
        _state["watched"] = True

    def report_once() -> None:
        with _lock:
            if _state["reported"] or alive():
                return
            _state["reported"] = True
        on_orphaned()

    def watch() -> None:
        stop = threading.Event()
        while not stop.wait(poll_s):
            if not alive():
                try:
                    report_once()
                finally:
                    # its own workers (a propagation pool, nnU-Net's augmentation workers) would block on
                    # their queues for ever once this process is gone
                    for pid in descendants(os.getpid()):
                        with contextlib.suppress(ProcessLookupError, PermissionError):
                            os.kill(pid, signal.SIGKILL)
                    os._exit(ORPHAN_EXIT_CODE)

    atexit.register(report_once)
    # a forkserver or fork child leaves through os._exit, past atexit: multiprocessing's own finalizers run
    multiprocessing.util.Finalize(None, report_once, exitpriority=10)
    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()
    return True


def process_table() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, session id) of every live (non-zombie) process, from Linux ``/proc``."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":
            table[int(entry.name)] = (int(fields[1]), int(fields[3]))
    return table


def descendants(root: int) -> set[int]:
    """Live processes below ``root`` in the process tree (children, their children, ...)."""
    parents = {pid: ppid for pid, (ppid, _) in process_table().items()}
    found, frontier = set(), {root}
    while frontier:
        frontier = {pid for pid, ppid in parents.items() if ppid in frontier} - found
        found |= frontier
    return found


def alive(pids: set[int]) -> set[int]:
    return pids & set(process_table())


def session_processes(session_id: int) -> set[int]:
    """Live processes of a session: everything a session leader started, reparented or not, unless it called
    ``setsid`` itself (no Dagster process does)."""
    return {pid for pid, (_, sid) in process_table().items() if sid == session_id}


def stop_session(leader: subprocess.Popen, grace_s: float = 30.0, poll_s: float = 0.2) -> int:
    """Stop a process started with ``start_new_session=True`` and everything in its session.

    SIGINT to the leader first, which ``dagster dev`` turns into an orderly shutdown of its webserver,
    daemon and code server. Whatever outlives ``grace_s`` (a code server busy in a run, the run's step
    workers) gets SIGTERM, which Dagster turns into a failed step and run, and after another ``grace_s``
    SIGKILL. Returns the leader's exit code."""
    if leader.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(leader.pid, signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            leader.wait(timeout=grace_s)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        members = session_processes(leader.pid)
        for pid in members:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace_s
        while session_processes(leader.pid) and time.monotonic() < deadline:
            time.sleep(poll_s)
    while session_processes(leader.pid):  # only SIGKILLed processes remain: they are going
        time.sleep(poll_s)
    return leader.wait()
