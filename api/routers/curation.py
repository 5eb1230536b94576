"""The served version's curation removals (removals.parquet), for the curation browser at /curation."""
from __future__ import annotations

import math
from typing import Annotated, Any, Literal

import polars as pl
from fastapi import APIRouter, Query
from pydantic import BaseModel, Field

from api.dependencies import ServiceDep, SettingsDep, check_category, form_category, image_url, versioned
from api.errors import R404_CATEGORY, R503
from api.schemas import UNLABELLED
from api.service import redact_paths
from curation_dagster.core.artifacts import REMOVALS_FILE

router = APIRouter()

REASONS = ("duplicate", "misaligned")
_COLUMNS = {  # removals.parquet columns this route reads, with the type a missing one is filled with
    "record_id": pl.Int64, "stage": pl.Utf8, "reason": pl.Utf8, "detail": pl.Utf8, "alignment_score": pl.Float64,
    "threshold": pl.Float64, "duplicate_of": pl.Int64, "similarity": pl.Float64, "evidence": pl.Utf8,
    "designation": pl.Utf8, "description": pl.Utf8, "prdtypecode": pl.Int64, "category": pl.Utf8,
    "image_file": pl.Utf8, "kept_designation": pl.Utf8, "kept_image_file": pl.Utf8,
}


class Removal(BaseModel):
    record_id: int
    reason: str = Field(description="duplicate | misaligned")
    stage: str | None = None
    detail: str | None = None
    designation: str | None = None
    description: str | None = None
    prdtypecode: int | None = None
    category: str | None = None
    image_url: str | None = Field(None, description="the removed row's image")
    alignment_score: float | None = Field(None, description="cosine(image, text) of the removed row")
    threshold: float | None = Field(None, description="misaligned: the alignment threshold it fell under")
    duplicate_of: int | None = Field(None, description="duplicate: the record it duplicates (kept)")
    similarity: float | None = Field(None, description="duplicate: similarity of the link")
    evidence: str | None = Field(None, description="duplicate: image | text | sha256")
    kept_designation: str | None = None
    kept_image_url: str | None = None
    kept_served: bool = Field(False, description="duplicate_of is a record of the served version (GET /record)")


class RemovalsPage(BaseModel):
    version: str
    total: int = Field(description="removals matching the filters")
    page: int
    page_size: int
    pages: int
    counts: dict[str, int] = Field(description="removals of the version per reason (unfiltered)")
    categories: dict[str, str] = Field(description='categories of removed rows: prdtypecode → name, and "unlabelled"')
    note: str | None = Field(None, description="why the list is empty when the version has no removals table")
    items: list[Removal]


def _table(df: pl.DataFrame) -> pl.DataFrame:
    """The columns this route reads, sorted by reason then record_id. A table from another writer or an older
    format must not make the page fail: a missing column, or one whose type does not cast (a list, a struct), reads
    as nulls, and a row without a usable record_id is left out (a Removal names its record)."""
    cols = []
    for c, t in _COLUMNS.items():
        col = None
        if c in df.columns:
            try:
                col = df[c].cast(t, strict=False).alias(c)
            except Exception:  # noqa: BLE001 - polars raises several types for an impossible cast
                col = None
        cols.append(col if col is not None else pl.Series(c, [None] * df.height, dtype=t))
    return pl.DataFrame(cols).filter(pl.col("record_id").is_not_null()).sort("reason", "record_id", nulls_last=True)


def _finite(v: Any) -> float | None:
    return float(v) if v is not None and math.isfinite(v) else None


@router.get("/curation/removals", response_model=RemovalsPage, summary="Curation removals of the served version",
            responses={**R404_CATEGORY, **R503})
def removals(
    svc: ServiceDep,
    settings: SettingsDep,
    reason: Annotated[Literal["duplicate", "misaligned"] | None, Query(description="only this reason")] = None,
    category: Annotated[str | None, Query(description='only removed rows of this prdtypecode, or "unlabelled"',
                                          pattern=r"^([0-9]{1,9}|unlabelled)$")] = None,
    page: Annotated[int, Query(ge=1, le=1_000_000, description="1-based page")] = 1,
    page_size: Annotated[int, Query(ge=1, le=100)] = 20,
):
    """The rows curation removed from the served version, by reason (duplicate: with the kept record and the
    similarity; misaligned: with the alignment score and threshold), paged. 200 with an empty list and a `note`
    when the version carries no removals table."""
    snap = svc.snapshot()
    corpus = snap.corpus
    cat = check_category(snap, form_category(category))
    empty = dict(version=corpus.name, total=0, page=page, page_size=page_size, pages=0, counts={}, categories={},
                 items=[])
    if corpus.removals is None:
        note = (f"the removals table of curated version {corpus.name} cannot be read: "
                f"{redact_paths(corpus.removals_error, settings.artifacts_dir)}"
                if corpus.removals_error else
                f"curated version {corpus.name} has no {REMOVALS_FILE} (written by a pipeline that did not record "
                "removals for review): nothing to show")
        return versioned(RemovalsPage(note=note, **empty), snap)
    table = _table(corpus.removals)
    counts = {r: int(n) for r, n in table.group_by("reason").len().sort("reason").iter_rows() if r is not None}
    cats = table.select("prdtypecode", "category").unique().sort("prdtypecode", nulls_last=True)
    categories = {(UNLABELLED if c is None else str(c)): (n or (UNLABELLED if c is None else str(c)))
                  for c, n in cats.iter_rows()}
    if reason is not None:
        table = table.filter(pl.col("reason") == reason)
    if cat == UNLABELLED:
        table = table.filter(pl.col("prdtypecode").is_null())
    elif cat is not None:
        table = table.filter(pl.col("prdtypecode") == int(cat))
    total = table.height
    rows = table.slice((page - 1) * page_size, page_size).to_dicts() if (page - 1) * page_size < total else []
    items = []
    for r in rows:
        kept = r["duplicate_of"]
        items.append(Removal(
            record_id=r["record_id"], reason=r["reason"] or "", stage=r["stage"], detail=r["detail"],
            designation=r["designation"], description=r["description"], prdtypecode=r["prdtypecode"],
            category=r["category"],
            image_url=image_url(settings, r["image_file"]) if r["image_file"] else None,
            alignment_score=_finite(r["alignment_score"]), threshold=_finite(r["threshold"]),
            duplicate_of=kept, similarity=_finite(r["similarity"]), evidence=r["evidence"],
            kept_designation=r["kept_designation"],
            kept_image_url=image_url(settings, r["kept_image_file"]) if r["kept_image_file"] else None,
            kept_served=kept is not None and -(2**63) <= kept < 2**63 and corpus.row_of(kept) is not None,
        ))
    page_out = RemovalsPage(**dict(empty, total=total, pages=-(-total // page_size), counts=counts,
                                   categories=categories, items=items))
    return versioned(page_out, snap)
