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
