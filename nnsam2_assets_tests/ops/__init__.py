"""Operations tests: sensors and schedules, automation conditions, pools, Docker config, Postgres, web UI.

Small shared helpers live here (the fixtures stay in each test module).
"""

from __future__ import annotations

import socket
from pathlib import Path

from nnsam2_assets.pipeline import INGEST
from nnsam2_assets.testing.cohorts import write_tiny

REPO = Path(__file__).resolve().parents[2]
__all__ = ["INGEST", "REPO", "free_port", "write_tiny"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
