"""What the routers share: the service and settings of the app answering the request, image URLs, hit rows, the
category check and the versioned JSON response.

``create_app`` puts ``settings``, ``service`` (once the lifespan has started it), ``decode_upload`` and
``decode_gate`` on ``app.state``; the dependencies below read them from the request, so that every app built by
``create_app`` (tests build several) uses its own.
"""
from __future__ import annotations

import threading
from typing import Annotated, Any, Callable
from urllib.parse import quote

from fastapi import Depends, HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from api.inbox import InboxDelta
from api.schemas import UNLABELLED
from api.service import SearchService, Snapshot
from api.settings import ApiSettings


async def get_service(request: Request) -> SearchService:
    return request.app.state.service


async def get_settings(request: Request) -> ApiSettings:
    return request.app.state.settings


async def get_delta(request: Request) -> "InboxDelta":
    return request.app.state.delta


async def get_decoder(request: Request) -> Callable[..., Any]:
    return request.app.state.decode_upload


async def get_decode_gate(request: Request) -> threading.Semaphore:
    return request.app.state.decode_gate


ServiceDep = Annotated[SearchService, Depends(get_service)]
DeltaDep = Annotated["InboxDelta", Depends(get_delta)]
SettingsDep = Annotated[ApiSettings, Depends(get_settings)]
DecoderDep = Annotated[Callable[..., Any], Depends(get_decoder)]
DecodeGateDep = Annotated[threading.Semaphore, Depends(get_decode_gate)]


def image_url(settings: ApiSettings, image_file: str) -> str:
    # Never from the request's Host header: relative unless a public base URL is configured.
    return f"{settings.public_url or ''}/images/{quote(image_file)}"


def hit_row(settings: ApiSettings, rec: dict[str, Any], score: float) -> dict[str, Any]:
    """One record's fields (a served row or an inbox product) as the JSON row of SearchHit."""
    return {
        "record_id": rec["record_id"],
        "score": score,
        "image_url": image_url(settings, rec["image_file"]),
        "designation": rec["designation"],
        "prdtypecode": rec["prdtypecode"],
        "category": rec["category"],
        "alignment_score": rec["alignment_score"],
    }


def hits(settings: ApiSettings, snap: Snapshot, found: list[tuple[int, float]]) -> list[dict[str, Any]]:
    """Search results (corpus row, score) as the JSON rows of SearchHit, in the given order."""
    rows = snap.corpus.hit_fields([r for r, _ in found])
    return [hit_row(settings, rec, score) for rec, (_, score) in zip(rows, found)]


def merged_hits(settings: ApiSettings, snap: Snapshot, found: list[tuple[int, float]], delta: InboxDelta | None,
                query, k: int, category: int | str | None) -> list[dict[str, Any]]:
    """Served-version hits merged with the inbox products not in it yet (the delta), best first, k at most. The
    caller syncs the delta first (before sizing ``found`` with :func:`overfetch`)."""
    rows = hits(settings, snap, found)
    if delta is None:
        return rows
    hidden = delta.hidden()
    if hidden:
        rows = [r for r in rows if r["record_id"] not in hidden]
    extra = [hit_row(settings, rec, score) for score, rec in delta.search(query, k, category)]
    if not extra:
        return rows[:k]
    return sorted(rows + extra, key=lambda h: -h["score"])[:k]


def overfetch(delta: InboxDelta | None, k: int) -> int:
    """How many served hits to ask the index for so that k remain once the deleted ones are left out."""
    return k if delta is None else k + len(delta.hidden())


def check_category(snap: Snapshot, category: int | str | None) -> int | str | None:
    """404 for a category filter that names no category this service knows (an empty 200 would read as "no
    match"); any integer is a well-formed filter, so it is the category that is not found, not the request
    that is malformed."""
    why = snap.corpus.unknown_category(category)
    if why:
        raise HTTPException(404, why)
    return category


def form_category(category: str | None) -> int | str | None:
    """A category sent as a form or query string ("2583", "unlabelled" or absent) as the filter value."""
    return None if category is None else (category if category == UNLABELLED else int(category))


def versioned(payload: Any, snap: Snapshot, timing: dict[str, float] | None = None) -> JSONResponse:
    """JSON response tagged with the curated version that answered it (and Server-Timing, in ms)."""
    headers = {"X-Curated-Version": snap.corpus.name}
    if timing:
        headers["Server-Timing"] = ", ".join(f"{k};dur={v * 1e3:.3f}" for k, v in timing.items())
    content = payload.model_dump(mode="json") if isinstance(payload, BaseModel) else payload
    return JSONResponse(content, headers=headers)
