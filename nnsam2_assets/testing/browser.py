"""Headless Chromium for the tests that look at what a user sees (the web UI, the cohort report)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

# every connection fails: an unreachable proxy for all hosts, and no name resolves
OFFLINE = [
    "--proxy-server=http://127.0.0.1:9",
    "--proxy-bypass-list=<-loopback>",
    "--host-resolver-rules=MAP * ~NOTFOUND",
]


def chromium(url: str, user_dir: Path, *flags: str, window: str = "1600,1000") -> subprocess.CompletedProcess:
    """Run headless Chromium on ``url`` with ``flags`` (e.g. --dump-dom, --screenshot=...); no time limit, so a
    slow machine only waits longer. A screenshot's file is removed first: an earlier run's must not pass for
    this one's."""
    for flag in flags:
        if flag.startswith("--screenshot="):
            Path(flag.split("=", 1)[1]).unlink(missing_ok=True)
    binary = shutil.which("chromium")
    assert binary, "chromium not installed: run `bash .ci/bootstrap.sh --system`"
    args = [
        binary,
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--hide-scrollbars",
        f"--window-size={window}",
        f"--user-data-dir={user_dir}",
        "--virtual-time-budget=20000",
        *flags,
        url,
    ]
    # no timeout: the virtual time budget ends the page, however slow the machine
    return subprocess.run(args, capture_output=True, text=True, start_new_session=True)
