"""Deterministic stratified sampling by product type.

Deterministic so that a re-run on the same source picks the same rows (and the embedding cache stays warm); stratified
so that small classes are not drowned out by the large ones (the real training set ranges 764–10,209 rows per class).
"""
from __future__ import annotations

from dataclasses import dataclass

import polars as pl


@dataclass(frozen=True)
class SampleSpec:
    max_rows: int | None = None        # total budget; None = everything (after per_class_cap)
    per_class_cap: int | None = None   # at most this many rows per class
    min_per_class: int = 1             # guaranteed rows per class when the budget allows
    seed: int = 0

    def validate(self) -> None:
        if self.max_rows is not None and self.max_rows < 1:
            raise ValueError(f"max_rows must be >= 1 or None, got {self.max_rows}")
        if self.per_class_cap is not None and self.per_class_cap < 1:
            raise ValueError(f"per_class_cap must be >= 1 or None, got {self.per_class_cap}")
        if self.min_per_class < 0:
            raise ValueError(f"min_per_class must be >= 0, got {self.min_per_class}")


def _allocate(sizes: dict[int, int], spec: SampleSpec) -> dict[int, int]:
    """Rows to take per class: a guaranteed floor, then the rest proportionally (largest remainders), within caps."""
    caps = {c: min(n, spec.per_class_cap) if spec.per_class_cap else n for c, n in sizes.items()}
    total_cap = sum(caps.values())
    budget = total_cap if spec.max_rows is None else min(spec.max_rows, total_cap)
    floor = {c: min(caps[c], spec.min_per_class) for c in caps}
    if sum(floor.values()) > budget:
        # Not enough budget for every class's floor: an equal floor that fits (the rest of the budget is still shared
        # out below; returning here gave 27 rows for max_rows=200, min_per_class=10); under one row per class, one
        # row to as many classes as possible, smallest classes first.
        share = budget // len(caps)
        if share == 0:
            alloc = {c: 0 for c in caps}
            for c in sorted(caps, key=lambda c: (sizes[c], c))[:budget]:
                alloc[c] = 1
            return alloc
        floor = {c: min(caps[c], share) for c in caps}
    alloc = dict(floor)
    remaining = budget - sum(alloc.values())
    room = {c: caps[c] - alloc[c] for c in caps}
    total_room = sum(room.values())
    if remaining and total_room:
        shares = {c: remaining * room[c] / total_room for c in caps}
        for c in caps:
            alloc[c] += int(shares[c])
        left = budget - sum(alloc.values())
        order = sorted(caps, key=lambda c: (-(shares[c] - int(shares[c])), c))
        for c in order:
            if left <= 0:
                break
            if alloc[c] < caps[c]:
                alloc[c] += 1
                left -= 1
    return alloc


UNLABELLED = -1  # the stratum of rows without a class (real codes are positive)


def stratified_sample(df: pl.DataFrame, spec: SampleSpec, label_col: str = "prdtypecode",
                      id_col: str = "record_id") -> pl.DataFrame:
    """Pick rows per class by a seeded hash of the id, so the choice is stable under row reordering.

    Unlabelled rows (null class) form one stratum of their own, sampled like a class."""
    spec.validate()
    if df.is_empty():
        return df
    stratum = pl.col(label_col).fill_null(UNLABELLED).alias("_stratum")
    df = df.with_columns(stratum)
    sizes = dict(df.group_by("_stratum").len().iter_rows())
    alloc = _allocate(sizes, spec)
    ranked = df.with_columns(
        pl.col(id_col).hash(seed=spec.seed).alias("_h")
    ).with_columns(pl.col("_h").rank("ordinal").over("_stratum").alias("_rank"))
    quota = pl.DataFrame({"_stratum": list(alloc), "_quota": list(alloc.values())},
                         schema={"_stratum": df.schema["_stratum"], "_quota": pl.Int64})
    out = ranked.join(quota, on="_stratum", how="left").filter(pl.col("_rank") <= pl.col("_quota"))
    return out.drop("_h", "_rank", "_quota", "_stratum").sort(label_col, id_col, nulls_last=True)


def class_distribution(df: pl.DataFrame, label_col: str = "prdtypecode") -> dict[str, int]:
    """Rows per class code (as a string key, JSON-ready); unlabelled rows under "unlabelled"."""
    counts = df.group_by(label_col).len().sort(label_col, nulls_last=True).iter_rows()
    return {("unlabelled" if k is None else str(int(k))): int(v) for k, v in counts}
