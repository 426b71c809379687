"""Per-scan result cache.

Each per-dataset asset stores one output per scan. A scan's cache key combines everything its output
depends on (scan content hash, annotation hash, code version, backend/model identity). A rematerialization
recomputes only scans whose key changed, so a new scan costs one scan while Dagster still sees a partition.
A scan's key is removed *before* its outputs are rewritten (``invalidate``) and written again *after* them, so
a crash in between only causes a recompute: outputs half-way to a new key are never taken for the old one's.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nnsam2_assets.core.storage import atomic_write_json, atomic_write_text, sha256_strings


def cache_key(*parts: object) -> str:
    return sha256_strings(str(p) for p in parts)[:32]


class ScanCache:
    """The keys and summaries of one per-dataset asset's per-scan outputs (under ``<folder>/_keys``).

    The usual loop is ``get_or_compute`` for every current scan, then ``forget_unseen``.
    """

    def __init__(self, folder: Path):
        self.folder = Path(folder) / "_keys"
        self._seen: set[str] = set()

    def _key_path(self, scan_id: str) -> Path:
        return self.folder / f"{scan_id}.key"

    def is_fresh(self, scan_id: str, key: str, outputs: list[Path]) -> bool:
        p = self._key_path(scan_id)
        return p.is_file() and p.read_text().strip() == key and all(Path(o).exists() for o in outputs)

    def invalidate(self, scan_id: str) -> None:
        """Forget the scan's key before its outputs are rewritten: if the run dies before ``record``, the
        outputs, part new and part old, must not pass for the old key's when the inputs go back to it."""
        self._key_path(scan_id).unlink(missing_ok=True)
        self._info_path(scan_id).unlink(missing_ok=True)

    def record(self, scan_id: str, key: str, info: dict[str, Any] | None = None) -> None:
        """Mark the scan's outputs current. ``info`` is a small per-scan summary (JSON) kept with the key, so
        later runs report on unchanged scans without reading their outputs again (new-scan cost stays O(1))."""
        if info is not None:
            atomic_write_json(info, self._info_path(scan_id))
        atomic_write_text(key, self._key_path(scan_id))

    def _info_path(self, scan_id: str) -> Path:
        return self.folder / f"{scan_id}.json"

    def info(self, scan_id: str) -> dict[str, Any] | None:
        """The summary recorded with the scan's current key, or None (older cache, or never recorded)."""
        p = self._info_path(scan_id)
        return json.loads(p.read_text()) if p.is_file() else None

    def get_or_compute(
        self, scan_id: str, key: str, outputs: list[Path], compute: Callable[[], dict[str, Any]]
    ) -> tuple[dict[str, Any], bool]:
        """The scan's recorded summary when its key and outputs are current; otherwise ``compute()`` (which
        writes the outputs and returns the summary), recorded under ``key``. Returns (summary, computed)."""
        self._seen.add(scan_id)
        info = self.info(scan_id) if self.is_fresh(scan_id, key, outputs) else None
        if info is not None:
            return info, False
        self.invalidate(scan_id)
        info = compute()
        self.record(scan_id, key, info)
        return info, True

    def forget_unseen(self) -> list[str]:
        """Forget every scan that ``get_or_compute`` was not asked about in this run."""
        return self.forget_others(self._seen)

    def forget_others(self, keep: set[str]) -> list[str]:
        """Drop keys of scans that left the dataset, so their stale outputs are not mistaken for fresh."""
        removed = []
        if self.folder.is_dir():
            for p in self.folder.glob("*.key"):
                if p.stem not in keep:
                    p.unlink(missing_ok=True)
                    self._info_path(p.stem).unlink(missing_ok=True)
                    removed.append(p.stem)
        return removed
