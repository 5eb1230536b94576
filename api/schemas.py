"""Request and response shapes of the search API (contract in docs/architecture.md and README "Search API")."""
from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, Field, Strict, field_validator

MAX_QUERY_CHARS = 1000
MAX_TOP_K = 100
_NOT_BLANK = re.compile(r"\S")
_SURROGATE = re.compile("[\ud800-\udfff]")



def _integral_float(v: Any) -> Any:
    """JSON Schema's "integer" includes 3.0: accept integral floats; 5.5, NaN, "5" and true stay invalid (strict)."""
    if isinstance(v, float) and v.is_integer() and abs(v) < 2**63:
        return int(v)
    return v


TopK = Annotated[int, Strict(), Field(ge=1, le=MAX_TOP_K, description=f"number of results, 1–{MAX_TOP_K}"),
                 BeforeValidator(_integral_float)]
UNLABELLED = "unlabelled"
Category = Annotated[int, Strict(), Field(description="restrict to this prdtypecode"), BeforeValidator(_integral_float)] \
    | Literal["unlabelled"]


class SearchRequest(BaseModel):
    """The seed's request (`{"query": ..., "top_k": 5}`) plus an optional category filter."""

    query: str = Field(
        ...,
        max_length=MAX_QUERY_CHARS,
        description="free text, any language/Unicode, not blank",
        examples=["armoire chambre enfants"],
        json_schema_extra={"pattern": r"\S"},  # documents the not-blank rule (checked below, same definition of blank)
    )
    top_k: TopK = 5
    category: Category | None = Field(
        None, description='a prdtypecode (see /stats "categories"), or "unlabelled" for products without a class')

    @field_validator("query")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not _NOT_BLANK.search(v):  # Python's \S ⇔ not str.isspace(): exactly what .strip() would remove
            raise ValueError("query must not be empty or blank")
        if _SURROGATE.search(v):  # JSON can carry "\udc00": not text, and no tokenizer or UTF-8 encoder takes it
            raise ValueError("query must be valid Unicode text (lone surrogate code points are not allowed)")
        return v


class SearchHit(BaseModel):
    record_id: int
    score: float = Field(description="cosine similarity between the query and the record's image embedding")
    image_url: str
    designation: str
    prdtypecode: int | None = Field(description="null for an unlabelled product")
    category: str | None
    alignment_score: float


class Record(BaseModel):
    record_id: int
    productid: int
    imageid: int
    designation: str
    description: str | None
    prdtypecode: int | None = Field(description="null for an unlabelled product")
    category: str | None
    source: str | None = Field(None, description='"api" for a product added through POST /records')
    image_file: str
    image_url: str
    alignment_score: float
    dup_group: int
    version: str


class AlignmentStats(BaseModel):
    min: float | None
    max: float | None
    mean: float | None
    p10: float | None
    p50: float | None
    p90: float | None


class Stats(BaseModel):
    num_records: int
    labelled: int = Field(description="records with a prdtypecode")
    unlabelled: int = Field(description="records without one (e.g. Kaggle's test part): searchable, filter 'unlabelled'")
    label_distribution: dict[str, int] = Field(description='records per prdtypecode, and "unlabelled"')
    categories: dict[str, str]
    inbox: int = Field(0, description="products added through the API and not yet in a published version (searchable)")
    alignment_score_stats: AlignmentStats
    version: str
    model: str
    dim: int
    created_at: str | None = None
    run_id: str | None = None
    counts: Any = Field(None, description="per-stage counts from the manifest")
    thresholds: Any = None
    index: dict[str, Any]
    meaningless: bool
    text_encoder: str | None = Field(None, description="how query texts are embedded: backend (onnx | torch), precision and why")
    query_queue: dict[str, Any] | None = Field(
        None, description="text queries waiting for the encoder now (`pending`) and, since the served encoder was "
                          "loaded, how many were `encoded`, refused at once because `max_pending` were waiting "
                          "(`shed`) or gave up after `timeout_s` (`timed_out`): both answered 503")
    note: str | None = None
    reload_error: dict[str, Any] | None = Field(None, description="last new version that failed to load (old one kept)")


class Ready(BaseModel):
    status: str
    version: str | None
    model: str | None
    device: str | None = None
    text_encoder: str | None = Field(None, description="how query texts are embedded: backend (onnx | torch), precision and why")
    pid: int | None = Field(None, description="serving process (several with `uvicorn --workers N`)")
    meaningless: bool | None = None
    note: str | None = None
    reload_error: dict[str, Any] | None = None
