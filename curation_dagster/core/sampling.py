"""Deterministic stratified sampling by product type.

Deterministic so that a re-run on the same source picks the same rows (and the embedding cache stays warm); stratified
so that small classes are not drowned out by the large ones (the real training set ranges 764–10,209 rows per class).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
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

_GOLDEN, _M1, _M2 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def stable_hash(ids: pl.Series, seed: int) -> np.ndarray:
    """A seeded 64-bit hash of each id that never changes (splitmix64 of integer ids; blake2b of others).

    Why not polars' ``hash``: it is documented as not stable across polars versions, so an upgrade would pick
    another sample from the same source, cool the embedding cache and make earlier results irreproducible."""
    if ids.dtype.is_integer():
        with np.errstate(over="ignore"):
            z = ids.to_numpy().astype(np.int64).view(np.uint64) + np.uint64(seed % 2**64) * _GOLDEN + _GOLDEN
            z = (z ^ (z >> np.uint64(30))) * _M1
            z = (z ^ (z >> np.uint64(27))) * _M2
            return z ^ (z >> np.uint64(31))
    key = seed.to_bytes(8, "little", signed=True)
    return np.array([int.from_bytes(hashlib.blake2b(str(v).encode(), digest_size=8, key=key).digest(), "little")
                     for v in ids.to_list()], dtype=np.uint64)


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
    ranked = df.with_columns(pl.Series("_h", stable_hash(df[id_col], spec.seed), dtype=pl.UInt64)).sort(
        "_h", id_col).with_columns((pl.int_range(pl.len()).over("_stratum") + 1).alias("_rank"))
    quota = pl.DataFrame({"_stratum": list(alloc), "_quota": list(alloc.values())},
                         schema={"_stratum": df.schema["_stratum"], "_quota": pl.Int64})
    out = ranked.join(quota, on="_stratum", how="left").filter(pl.col("_rank") <= pl.col("_quota"))
    return out.drop("_h", "_rank", "_quota", "_stratum").sort(label_col, id_col, nulls_last=True)


def class_distribution(df: pl.DataFrame, label_col: str = "prdtypecode") -> dict[str, int]:
    """Rows per class code (as a string key, JSON-ready); unlabelled rows under "unlabelled"."""
    counts = df.group_by(label_col).len().sort(label_col, nulls_last=True).iter_rows()
    return {("unlabelled" if k is None else str(int(k))): int(v) for k, v in counts}
