"""Atomic file writes and content hashing.

Readers must never see a half-written artefact: every writer here writes a temporary file in the
destination folder, fsyncs it, then renames it over the target (rename is atomic on POSIX within one
filesystem). A crash leaves at most a ``.tmp-*`` file, which no reader globs for.
"""

from __future__ import annotations

import errno
import functools
import gzip
import hashlib
import io
import json
import os
import shutil
import stat
import tempfile
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pandas as pd
import SimpleITK as sitk

TMP_PREFIX = ".tmp-"


class StorageError(RuntimeError):
    """A write failed; the message names the destination file."""


@functools.cache
def _new_file_mode() -> int:
    """0666 less the process's umask, as open() creates a file (read once: os.umask can only be read by
    setting it)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def _atomic_write(path: Path, write: Callable[[Path], None], keep_suffix: bool = False) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # SimpleITK infers the format from the name, so image temps keep the real suffix; other temps end in
    # ".part" so that globbing readers (SAM2 loads every *.jpg of a folder) never pick up a half-written file
    suffix = "".join(path.suffixes) if keep_suffix else ".part"
    fd, tmp_name = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        # mkstemp makes the file private (0600); the published file keeps the mode of the one it replaces,
        # or gets what open() would give it, so a group sharing the storage root can still read it
        os.chmod(tmp, stat.S_IMODE(path.stat().st_mode) if path.exists() else _new_file_mode())
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise StorageError(f"could not write {path}: {exc.strerror or exc}") from exc
        raise
    return path


def fsync_tree(folder: Path) -> None:
    """Flush every file and folder under ``folder`` (itself included) to disk: a folder renamed into place as a
    whole (a published model) must not reach the disk before its contents, or a crash leaves it complete in
    name and empty in its files."""
    for entry in sorted(Path(folder).rglob("*"), reverse=True) + [Path(folder)]:  # contents before folders
        fd = os.open(entry, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(data: bytes, path: Path) -> Path:
    return _atomic_write(Path(path), lambda tmp: tmp.write_bytes(data))


def atomic_write_text(text: str, path: Path) -> Path:
    return atomic_write_bytes(text.encode("utf-8"), path)


def atomic_write_json(obj: Any, path: Path) -> Path:
    return atomic_write_text(json.dumps(obj, indent=2, sort_keys=True, default=str), path)


GZIP_ERRORS = (EOFError, gzip.BadGzipFile, zlib.error)


def verify_gzip_stream(path: Path, limit: int | None = None) -> int:
    """Decompress the whole file, raising one of ``GZIP_ERRORS`` if the stream is cut short or corrupt;
    returns the decompressed length, or stops once it passes ``limit`` bytes (a stream that inflates
    without end is then refused by the caller, not read to the end).

    SimpleITK's NIfTI reader pads a truncated ``.nii.gz`` with zeros instead of failing, so neither a short
    write nor a truncated download would otherwise show."""
    total = 0
    with gzip.open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            total += len(chunk)
            if limit is not None and total > limit:
                break
    return total


def _write_image_checked(img: sitk.Image, tmp: Path) -> None:
    sitk.WriteImage(img, str(tmp), useCompression=True)
    # NIfTI's writer only PRINTS a short write (e.g. a full disk) and the truncated .gz may still read as a
    # valid, zero-padded image: verify the whole compressed stream before publishing it
    if tmp.name.endswith(".gz"):
        try:
            verify_gzip_stream(tmp)
        except GZIP_ERRORS as exc:
            raise _short_write(tmp, str(exc)) from exc
        return
    # uncompressed: the file holds at least every voxel's bytes, or the write was cut short
    data_bytes = img.GetNumberOfPixels() * img.GetNumberOfComponentsPerPixel() * img.GetSizeOfPixelComponent()
    if tmp.stat().st_size < data_bytes:
        raise _short_write(tmp, f"{tmp.stat().st_size:,} of at least {data_bytes:,} bytes")


def _short_write(tmp: Path, detail: str) -> OSError:
    code = errno.ENOSPC if shutil.disk_usage(tmp.parent).free < (1 << 20) else errno.EIO
    return OSError(code, f"{os.strerror(code)} (short NIfTI write: {detail})")


def atomic_write_image(img: sitk.Image, path: Path) -> Path:
    """Write a SimpleITK image (NIfTI by suffix) atomically, compressed, verified before it is published."""
    return _atomic_write(Path(path), lambda tmp: _write_image_checked(img, tmp), keep_suffix=True)


def atomic_write_dataframe(df: pd.DataFrame, path: Path) -> Path:
    """Write a DataFrame as parquet or csv, chosen by the file suffix."""
    path = Path(path)
    if path.suffix == ".parquet":
        buf = io.BytesIO()
        df.to_parquet(buf, index=False)
        return atomic_write_bytes(buf.getvalue(), path)
    if path.suffix == ".csv":
        return atomic_write_text(df.to_csv(index=False), path)
    raise ValueError(f"unsupported table suffix for {path}: use .parquet or .csv")


def remove_outputs(paths: Iterable[Path]) -> list[Path]:
    """Delete each file or folder that exists (a scan's results that must not outlive it); returns those."""
    removed = []
    for path in paths:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        elif path.exists():
            path.unlink(missing_ok=True)
        else:
            continue
        removed.append(path)
    return removed


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_path(path: Path) -> str:
    """Hash a file, or a folder (e.g. a DICOM series) by its sorted relative names and contents."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode())
        h.update(sha256_file(f).encode())
    return h.hexdigest()


def sha256_strings(parts: Iterable[str]) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode())
        h.update(b"\0")
    return h.hexdigest()
