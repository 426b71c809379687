"""exit_with_parent: a worker whose parent is killed runs its callback and exits instead of living on."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from nnsam2_assets.core.lifecycle import alive

CHILD = """
import sys, time
from pathlib import Path
from nnsam2_assets.core.lifecycle import exit_with_parent
marker = Path(sys.argv[1])
assert exit_with_parent(lambda: marker.write_text("orphaned"))
print("watching", flush=True)
time.sleep(3600)
"""

PARENT = """
import subprocess, sys
child = subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2]], stdout=subprocess.PIPE, text=True)
assert child.stdout.readline().strip() == "watching"
print(child.pid, flush=True)
child.wait()
"""


def test_a_child_exits_when_its_parent_is_killed(tmp_path):
    marker = tmp_path / "marker"
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, CHILD, str(marker)], stdout=subprocess.PIPE, text=True
    )
    child_pid = int(parent.stdout.readline())
    assert alive({child_pid})
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    while alive({child_pid}):  # no deadline: it must exit, however slow the machine
        time.sleep(0.2)
    assert marker.read_text() == "orphaned"


CHILD_WITH_A_WORKER = """
import multiprocessing, sys, time
from pathlib import Path
from nnsam2_assets.core.lifecycle import exit_with_parent

def work():
    time.sleep(3600)  # a pool worker blocked on its queue

if __name__ == "__main__":
    worker = multiprocessing.get_context("fork").Process(target=work)
    worker.start()
    assert exit_with_parent(lambda: Path(sys.argv[1]).write_text("orphaned"))
    print(worker.pid, flush=True)
    time.sleep(3600)
"""

LAUNCHER = """
import subprocess, sys
child = subprocess.Popen([sys.executable, *sys.argv[1:]], stdout=subprocess.PIPE, text=True)
print(child.pid, child.stdout.readline().strip(), flush=True)
child.wait()
"""


def test_an_orphaned_step_takes_its_own_workers_with_it(tmp_path):
    """The watch exited the step alone: the workers it had started (a propagation pool, nnU-Net's augmentation
    workers) blocked on their queues for ever."""
    script = tmp_path / "child.py"
    script.write_text(CHILD_WITH_A_WORKER)
    marker = tmp_path / "marker"
    launcher = subprocess.Popen(
        [sys.executable, "-c", LAUNCHER, str(script), str(marker)], stdout=subprocess.PIPE, text=True
    )
    child_pid, worker_pid = (int(v) for v in launcher.stdout.readline().split())
    assert alive({child_pid, worker_pid}) == {child_pid, worker_pid}
    os.kill(launcher.pid, signal.SIGKILL)
    launcher.wait()
    while alive({child_pid, worker_pid}):  # no deadline: both must exit, however slow the machine
        time.sleep(0.2)
    assert marker.read_text() == "orphaned"


FORKSERVER_STEP = """
import multiprocessing, sys, time
from pathlib import Path

def step(marker):
    from nnsam2_assets.core.lifecycle import exit_with_parent
    # a poll too slow to notice: the step ends first, as one finishing just after its launcher was killed
    assert exit_with_parent(lambda: Path(marker).write_text("orphaned"), poll_s=3600)
    print("watching", flush=True)
    while multiprocessing.parent_process().is_alive():
        time.sleep(0.05)

if __name__ == "__main__":
    child = multiprocessing.get_context("forkserver").Process(target=step, args=(sys.argv[1],))
    child.start()
    print(child.pid, flush=True)
    child.join()
"""


def test_a_forkserver_step_ending_after_its_launcher_died_still_reports_it(tmp_path):
    """The exit hook was an atexit handler, which a forkserver or fork child never runs (it leaves through
    os._exit): a step finishing within the watch's poll after its launcher was killed left the run STARTED."""
    script = tmp_path / "launcher.py"
    script.write_text(FORKSERVER_STEP)
    marker = tmp_path / "marker"
    launcher = subprocess.Popen([sys.executable, str(script), str(marker)], stdout=subprocess.PIPE, text=True)
    step_pid = int(launcher.stdout.readline())
    assert launcher.stdout.readline().strip() == "watching"
    os.kill(launcher.pid, signal.SIGKILL)
    launcher.wait()
    while alive({step_pid}):  # no deadline: it ends by itself once it sees its launcher gone
        time.sleep(0.2)
    assert marker.read_text() == "orphaned"
