"""Operations tests: sensors and schedules, automation conditions, pools, Docker config, Postgres, web UI.

Small shared helpers live here (the fixtures stay in each test module).
"""

from __future__ import annotations

import socket
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
INGEST = ["scans", "reference_annotation", "reference_ranking"]


def write_tiny(data_root: Path, name: str = "tiny", n_scans: int = 3, seed: int = 3) -> Path:
    """A tiny phantom Dixon dataset (64x64 in-plane): ingest runs in a couple of seconds."""
    from nnsam2_assets.lib.phantom import write_demo_dataset

    return write_demo_dataset(
        data_root, name, "dixon", n_scans, seed=seed, shape_yx=(64, 64), spacing=(3.2, 3.2, 4.0)
    )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
