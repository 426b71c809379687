"""The region table: the L3/L4-L5/S1 stretch of a scan as slice indices, and the one parser of both places
a user gives it (``regions.csv`` rows and dataset.yaml's ``region``: the same keys, the same rules).

A malformed table (unreadable, missing or unknown columns) refuses the dataset; a bad row only excludes its
scan. Every message names the file, the row (line number, header = 1) and the column.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from nnsam2_assets.ingest.errors import DatasetError

if TYPE_CHECKING:
    from _csv import _reader

REGION_COLUMNS = ("scan", "first_slice", "last_slice")
REGION_OPTIONAL_COLUMNS = ("l4_l5",)


class Region(NamedTuple):
    """Axial slice indices, in the scan file's own slice order, of the discs bounding the region (either
    order) and, optionally, of the L4/L5 disc strictly between them."""

    first: int
    last: int
    l4_l5: int | None = None

    @property
    def bounds(self) -> tuple[int, int]:
        return (min(self.first, self.last), max(self.first, self.last))

    def describe(self) -> str:
        lo, hi = self.bounds
        return f"{lo}-{hi}" + (f" (L4/L5 {self.l4_l5})" if self.l4_l5 is not None else "")


@dataclass(frozen=True)
class RegionTable:
    """regions.csv, parsed: valid rows by scan, per-scan errors, and each scan's row number (1 = header)."""

    regions: dict[str, Region]
    errors: dict[str, str]
    rows: dict[str, int]


MAX_TABLE_BYTES = 1 << 24  # 16 MiB: some 400,000 rows, far beyond any cohort
_INTEGER = re.compile(r"[+-]?[0-9]+")  # ASCII digits only: a regex's \d also takes other scripts' digits


def read_regions(path: Path) -> RegionTable:
    """Strict regions.csv: integer slice indices only, one row per scan, ``l4_l5`` optional (may be empty).

    A malformed table (unreadable, missing or unknown columns) refuses the dataset; a bad row only excludes its
    scan, a row with more values than the header, or fewer where a required column is left off, included
    (ending before an optional column leaves it empty). Blank lines, and a spreadsheet's empty
    rows, are skipped. Every message names the file, the row (line number in the file, header = 1) and the
    column.

    The table is UTF-8 (a byte-order mark allowed) or, failing that, Windows-1252: what a spreadsheet on
    Windows saves as "CSV (Comma delimited)", the usual way a regions.csv is made."""
    if not path.is_file():  # a pipe would block every sensor tick's read; a broken link is no table
        raise DatasetError(f"{path}: not a regular file")
    try:
        size = path.stat().st_size
        if size > MAX_TABLE_BYTES:  # read whole on every sensor tick: a huge file would hold gigabytes
            raise DatasetError(
                f"{path}: {size:,} bytes, more than a region table needs ({MAX_TABLE_BYTES:,})"
            )
        reader = csv.reader(io.StringIO(_decoded(path.read_bytes()), newline=""), skipinitialspace=True)
        header = next(reader, None)
        lines = list(_records_by_first_line(reader))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DatasetError(f"{path}: unreadable region table ({exc})") from exc
    columns = [c.strip() for c in header or []]
    while columns and not columns[-1]:  # a spreadsheet's used range wider than its table: empty header cells
        columns.pop()
    missing = set(REGION_COLUMNS) - set(columns)
    if missing:
        raise DatasetError(f"{path}: missing columns {sorted(missing)} (need {','.join(REGION_COLUMNS)})")
    unknown = [c for c in columns if c not in REGION_COLUMNS + REGION_OPTIONAL_COLUMNS]
    if unknown:
        raise DatasetError(
            f"{path}: unknown columns {unknown} (use {','.join(REGION_COLUMNS + REGION_OPTIONAL_COLUMNS)})"
        )
    if len(set(columns)) != len(columns):
        raise DatasetError(f"{path}: a column named twice in the header {','.join(columns)}")
    regions: dict[str, Region] = {}
    errors: dict[str, str] = {}
    rows: dict[str, int] = {}
    scan_at = columns.index("scan")
    for line, fields in lines:
        if not any(f.strip() for f in fields):
            continue
        scan = fields[scan_at].strip() if scan_at < len(fields) else ""
        if not scan:
            raise DatasetError(f"{path} row {line}, column scan: empty scan name")
        if scan in rows:
            errors[scan] = f"{path} rows {rows[scan]} and {line}: two regions for scan {scan!r}; keep one row"
            regions.pop(scan, None)
            continue
        rows[scan] = line
        if not any(f.strip() for f in fields[len(columns) :]):  # empty cells past the table are no values
            fields = fields[: len(columns)]
        left_off = columns[len(fields) :]
        # a value without its column shifts no other value; a row may end before optional trailing columns,
        # as a hand-written row or a table that gained the l4_l5 column after its rows were written does
        if len(fields) > len(columns) or not set(left_off) <= set(REGION_OPTIONAL_COLUMNS):
            errors[scan] = (
                f"{path} row {line}: {len(fields)} values where the header names {len(columns)} columns "
                f"({','.join(columns)})"
            )
            continue
        record = {c: v for c, v in zip(columns, fields, strict=False) if c != "scan"}
        try:
            regions[scan] = parse_region(record, f"{path} row {line}")
        except DatasetError as exc:
            errors[scan] = str(exc)
    return RegionTable(regions, errors, rows)


def _decoded(raw: bytes) -> str:
    try:
        return raw.decode("utf-8-sig")  # -sig: a spreadsheet's byte-order mark
    except UnicodeDecodeError:
        # not UTF-8: ASCII is the same in both, so only names with accents or umlauts read differently, and
        # those read as the spreadsheet wrote them; five bytes Windows-1252 leaves undefined still refuse it
        return raw.decode("cp1252")


def _records_by_first_line(reader: _reader) -> Iterator[tuple[int, list[str]]]:
    """Each record with the line it starts on: a quoted value holding a line break spans lines, and the
    reader's own count is the record's last line."""
    previous = reader.line_num
    for fields in reader:
        yield previous + 1, fields
        previous = reader.line_num


def parse_region(record: Mapping[str, object], where: str) -> Region:
    """One region, from a regions.csv row or dataset.yaml's ``region`` (the same keys, the same rules)."""
    for key in record:  # "scan" too: dataset.yaml's region is the reference's, a row names its scan apart
        if key not in REGION_COLUMNS[1:] + REGION_OPTIONAL_COLUMNS:
            raise DatasetError(
                f"{where}: unknown key {key!r} (use {', '.join(REGION_COLUMNS[1:] + REGION_OPTIONAL_COLUMNS)})"
            )
    first, last = (_slice_index(record.get(c, ""), where, c) for c in REGION_COLUMNS[1:])
    raw = record.get("l4_l5")
    l4_l5 = None if raw is None or str(raw).strip() == "" else _slice_index(raw, where, "l4_l5")
    lo, hi = sorted((first, last))
    if l4_l5 is not None and not lo < l4_l5 < hi:
        raise DatasetError(
            f"{where}, column l4_l5: the L4/L5 disc slice {l4_l5} must lie strictly between the region's "
            f"discs {lo} and {hi}"
        )
    return Region(first, last, l4_l5)


MAX_INDEX_DIGITS = 9  # a slice index of a real scan has at most 4 or 5


def _slice_index(value: object, where: str, column: str) -> int:
    text = str(value).strip()
    if not _INTEGER.fullmatch(text):
        shown = "empty" if not text else f"{text!r} is not an integer slice index"
        raise DatasetError(f"{where}, column {column}: {shown}")
    # Python refuses to read 4,300 digits, and a float of a few hundred overflows in region finding
    if len(text.lstrip("+-")) > MAX_INDEX_DIGITS:
        raise DatasetError(f"{where}, column {column}: {text[:20]}... is no slice index ({len(text)} digits)")
    index = int(text)
    if index < 0:
        raise DatasetError(f"{where}, column {column}: slice index {index} is negative")
    return index
