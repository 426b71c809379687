"""Do two metrics databases hold the same rows? Each table of the ``metrics`` schema is compared with
``EXCEPT ALL`` in both directions, leaving out the columns that name a run rather than a result.

    .venv/bin/python -m bench.compare_metrics BEFORE.duckdb AFTER.duckdb [--ignore run_id computed_at ...]

Exit status 0 when every table matches, 1 otherwise. Used to show that a refactoring changed no number.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import duckdb

from nnsam2_assets.metrics.store import SCHEMA

RUN_COLUMNS = ("run_id", "computed_at")


def _columns(con: duckdb.DuckDBPyConnection, catalog: str, table: str) -> list[str]:
    rows = con.execute(
        "SELECT column_name FROM information_schema.columns WHERE table_catalog = ? AND table_schema = ? "
        "AND table_name = ? ORDER BY ordinal_position",
        [catalog, SCHEMA, table],
    ).fetchall()
    return [r[0] for r in rows]


def compare(before: Path, after: Path, ignore: tuple[str, ...] = RUN_COLUMNS) -> list[dict]:
    """One row per table: row counts and the sizes of both set differences."""
    con = duckdb.connect()
    con.execute(f"ATTACH '{before}' AS before (READ_ONLY)")
    con.execute(f"ATTACH '{after}' AS after (READ_ONLY)")
    tables = sorted(
        {
            r[0]
            for r in con.execute(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = ?", [SCHEMA]
            ).fetchall()
        }
    )
    out = []
    for table in tables:
        cols_b, cols_a = _columns(con, "before", table), _columns(con, "after", table)
        kept = ", ".join(f'"{c}"' for c in cols_b if c not in ignore and c in cols_a)

        def count(sql: str) -> int:
            return int(con.execute(sql).fetchone()[0])

        b, a = f"before.{SCHEMA}.{table}", f"after.{SCHEMA}.{table}"
        out.append(
            {
                "table": table,
                "rows_before": count(f"SELECT count(*) FROM {b}") if cols_b else 0,
                "rows_after": count(f"SELECT count(*) FROM {a}") if cols_a else 0,
                "before_except_after": count(
                    f"SELECT count(*) FROM (SELECT {kept} FROM {b} EXCEPT ALL SELECT {kept} FROM {a})"
                )
                if cols_b and cols_a
                else -1,
                "after_except_before": count(
                    f"SELECT count(*) FROM (SELECT {kept} FROM {a} EXCEPT ALL SELECT {kept} FROM {b})"
                )
                if cols_b and cols_a
                else -1,
                "same_columns": cols_b == cols_a,
            }
        )
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("before", type=Path)
    ap.add_argument("after", type=Path)
    ap.add_argument(
        "--ignore", nargs="*", default=list(RUN_COLUMNS), help="columns left out of the comparison"
    )
    args = ap.parse_args(argv)
    rows = compare(args.before, args.after, tuple(args.ignore))
    same = True
    for r in rows:
        ok = r["rows_before"] == r["rows_after"] and r["before_except_after"] == r["after_except_before"] == 0
        same &= ok and r["same_columns"]
        print(
            f"{r['table']:18s} rows {r['rows_before']:6d} / {r['rows_after']:6d}   before EXCEPT after "
            f"{r['before_except_after']:4d}   after EXCEPT before {r['after_except_before']:4d}   "
            f"columns {'same' if r['same_columns'] else 'DIFFER'}   {'OK' if ok else 'DIFFERENT'}"
        )
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
