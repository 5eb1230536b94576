"""Names of the 27 official Rakuten France `prdtypecode`s, shipped with the package.

Why: the Kaggle download has no categories.csv, and bare codes (2583) mean nothing to the person reading a report or
a search result. A `categories.csv` in the source directory overrides these names; codes that neither knows are
shown as the code and reported once (raw_products' log and metadata).
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import polars as pl

CATEGORIES_FILE = Path(__file__).with_name("data") / "categories.csv"
SCHEMA = {"prdtypecode": pl.Int64, "category": pl.Utf8, "category_en": pl.Utf8}


@lru_cache(maxsize=1)
def official_categories() -> pl.DataFrame:
    """prdtypecode, category (French), category_en for the 27 official codes."""
    df = pl.read_csv(CATEGORIES_FILE, infer_schema=False)
    return df.select(pl.col("prdtypecode").cast(pl.Int64), pl.col("category_fr").alias("category"),
                     pl.col("category_en"))


def official_codes() -> frozenset[int]:
    return frozenset(official_categories()["prdtypecode"].to_list())
