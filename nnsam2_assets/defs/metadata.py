"""Metadata helpers shared by the asset modules (no domain logic here)."""

from __future__ import annotations

import math

import dagster as dg
import pandas as pd

MAX_TABLE_ROWS = 40


def _cell(value: object) -> object:
    if hasattr(value, "item"):  # numpy scalars
        value = value.item()
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        return None if isinstance(value, float) and not math.isfinite(value) else value
    return "" if value is None else str(value)


def table(df: pd.DataFrame, columns: list[str], max_rows: int = MAX_TABLE_ROWS) -> dg.TableMetadataValue:
    """The first ``max_rows`` rows of ``df``'s ``columns`` (those present) as a Dagster table."""
    cols = [c for c in columns if c in df.columns]
    shown = df[cols].head(max_rows) if cols else pd.DataFrame()
    return dg.MetadataValue.table(
        records=[
            dg.TableRecord({c: _cell(v) for c, v in zip(cols, row, strict=True)})
            for row in shown.itertuples(index=False)
        ],
        schema=dg.TableSchema(columns=[dg.TableColumn(c, _column_type(df[c])) for c in cols]),
    )


def _column_type(series: pd.Series) -> str:
    if pd.api.types.is_bool_dtype(series):
        return "bool"
    if pd.api.types.is_integer_dtype(series):
        return "int"
    if pd.api.types.is_float_dtype(series):
        return "float"
    return "string"


def latest_metadata(instance: dg.DagsterInstance, asset: str, partition: str | None = None) -> dict:
    """Metadata of the latest materialization of an asset (partition), or {} if there is none."""
    flt = dg.AssetRecordsFilter(
        asset_key=dg.AssetKey(asset), asset_partitions=[partition] if partition else None
    )
    records = instance.fetch_materializations(flt, limit=1).records
    if not records or records[0].asset_materialization is None:
        return {}
    return {k: getattr(v, "value", v) for k, v in records[0].asset_materialization.metadata.items()}
