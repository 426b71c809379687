"""Atomic writes publish files readable as open() would make them, and a scan's cache key never survives a
recompute that died half-way."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from nnsam2_assets.core.cache import ScanCache
from nnsam2_assets.core.storage import atomic_write_text


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_an_atomic_write_gets_the_umask_mode_and_keeps_an_existing_files_mode(tmp_path):
    old = os.umask(0o022)
    try:
        new = atomic_write_text("a", tmp_path / "new.txt")
        assert _mode(new) == 0o644  # not mkstemp's private 0600: a group sharing the storage root reads it
        shared = tmp_path / "shared.txt"
        shared.write_text("a")
        shared.chmod(0o664)
        atomic_write_text("b", shared)
        assert _mode(shared) == 0o664 and shared.read_text() == "b"
    finally:
        os.umask(old)


def test_a_recompute_that_dies_leaves_no_key_for_its_half_written_outputs(tmp_path):
    cache, out = ScanCache(tmp_path), tmp_path / "s0.txt"

    def compute(content: str, die: bool = False):
        def run() -> dict:
            out.write_text(content)
            if die:
                raise RuntimeError("killed mid-write")
            return {"content": content}

        return run

    assert cache.get_or_compute("s0", "K1", [out], compute("from K1")) == ({"content": "from K1"}, True)
    with pytest.raises(RuntimeError):
        cache.get_or_compute("s0", "K2", [out], compute("from K2", die=True))
    # the inputs go back to K1: the output now holds K2's half-done work and must be recomputed
    assert not cache.is_fresh("s0", "K1", [out])
    assert cache.get_or_compute("s0", "K1", [out], compute("from K1")) == ({"content": "from K1"}, True)
    assert out.read_text() == "from K1"


@pytest.mark.parametrize("name", ["image.nii", "image.nii.gz"])
def test_a_short_image_write_is_refused_and_nothing_is_published(tmp_path, monkeypatch, name):
    """SimpleITK's NIfTI writer only prints a short write (a full disk, a file size limit). The compressed
    stream was verified; an uncompressed file was published truncated, as if complete."""
    import numpy as np
    import SimpleITK as sitk

    from nnsam2_assets.core import storage

    write = sitk.WriteImage

    def cut_short(image, path, *args, **kwargs):
        write(image, path, *args, **kwargs)
        with open(path, "r+b") as fh:
            fh.truncate(os.path.getsize(path) // 2)

    monkeypatch.setattr(storage.sitk, "WriteImage", cut_short)
    image = sitk.GetImageFromArray(np.random.default_rng(0).normal(size=(8, 64, 64)).astype(np.float32))
    with pytest.raises(storage.StorageError, match="short NIfTI write"):
        storage.atomic_write_image(image, tmp_path / name)
    assert list(tmp_path.iterdir()) == []
