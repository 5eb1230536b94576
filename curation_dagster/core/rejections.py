"""The rejection table: the contract every stage keeps for the rows it does not pass on.

One row per rejected row: which record, at which stage, a machine-readable reason and a human-readable detail (file
and line, the image problem...). Counts add up: rows in = rows passed on + rows rejected, stage by stage.
"""
from __future__ import annotations

import polars as pl

REJECTION_SCHEMA = {
    "record_id": pl.Int64,
    "stage": pl.Utf8,
    "reason": pl.Utf8,
    "detail": pl.Utf8,
}


def empty_rejections() -> pl.DataFrame:
    return pl.DataFrame(schema=REJECTION_SCHEMA)


def make_rejections(record_ids, stage: str, reasons, details) -> pl.DataFrame:
    n = len(record_ids)
    reasons = [reasons] * n if isinstance(reasons, str) else list(reasons)
    return pl.DataFrame(
        {"record_id": list(record_ids), "stage": [stage] * n, "reason": reasons, "detail": list(details)},
        schema=REJECTION_SCHEMA,
    )
