"""Text → image and image → image search."""
from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, File, Form, HTTPException, Query, UploadFile
from fastapi.concurrency import run_in_threadpool

from api.dependencies import (
    DecodeGateDep, DecoderDep, DeltaDep, ServiceDep, SettingsDep, check_category, form_category, hits, merged_hits, overfetch,
    versioned,
)
from api.errors import R400, R404, R404_CATEGORY, R413, R415, R503
from api.schemas import SearchHit, SearchRequest
from api.uploads import UPLOAD_PATH, too_large

router = APIRouter()


@router.post("/search", response_model=list[SearchHit], summary="Text → image search",
             responses={**R400, **R404_CATEGORY, **R413, **R503})
async def search(body: SearchRequest, svc: ServiceDep, settings: SettingsDep, delta: DeltaDep):
    """Top-k curated records for a text query; `score` is cosine(query, image embedding). Best first."""
    # async: the request waits for its query vector on the event loop (the batcher's threads encode), instead of
    # holding a threadpool thread that waits; measured ~0.6 ms less server CPU per request on 2 cores. What runs
    # on the loop is short: an approximate (or small exact) index search and the record lookup. A large exact
    # search and an inbox replay (it may embed) go to the threadpool.
    snap = svc.snapshot()
    check_category(snap, body.category)
    t0 = time.perf_counter()
    q = await snap.encode_text_async(body.query.strip())
    t1 = time.perf_counter()
    index = snap.corpus.index
    if delta is not None and not delta.synced(snap):  # first: the served records deleted since count in k
        await run_in_threadpool(delta.sync, snap)
    k = overfetch(delta, body.top_k)
    if index.cheap(body.category):
        found = index.search(q, k, body.category)
    else:
        found = await run_in_threadpool(index.search, q, k, body.category)
    t2 = time.perf_counter()
    out = merged_hits(settings, snap, found, delta, q, body.top_k, body.category)  # plain JSON types already
    return versioned(out, snap, {"encode": t1 - t0, "search": t2 - t1, "records": time.perf_counter() - t2})


@router.post(
    UPLOAD_PATH,
    response_model=list[SearchHit],
    summary="Image → image search",
    responses={**R400, **R404_CATEGORY, **R413, **R415, **R503},
)
def search_image(
    svc: ServiceDep,
    settings: SettingsDep,
    decode_upload: DecoderDep,
    decode_gate: DecodeGateDep,
    delta: DeltaDep,
    file: Annotated[UploadFile, File(description="a JPEG, PNG or WebP image")],
    top_k: Annotated[int, Form(ge=1, le=100)] = 5,
    category: Annotated[str, Form(description='restrict to this prdtypecode, or "unlabelled" (omit for all)',
                                  pattern=r"^([0-9]{1,9}|unlabelled)$")] = None,  # type: ignore[assignment]
):
    """The curated records whose images are most similar to the uploaded one."""
    data = file.file.read(settings.max_upload_bytes + 1)
    if len(data) > settings.max_upload_bytes:
        raise HTTPException(413, too_large(settings.max_upload_bytes))
    snap = svc.snapshot()
    category_ = check_category(snap, form_category(category))
    image = decode_upload(data, max_pixels=settings.max_upload_pixels, target=max(224, snap.image_size),
                          gate=decode_gate)
    del data
    q = snap.encode_image(image)
    delta.sync(snap)
    found = snap.corpus.index.search(q, overfetch(delta, top_k), category_)
    return versioned(merged_hits(settings, snap, found, delta, q, top_k, category_), snap)


@router.get("/similar/{record_id}", response_model=list[SearchHit], summary="More like this record",
            responses={**R404, **R503})
def similar(
    record_id: int,
    svc: ServiceDep,
    settings: SettingsDep,
    delta: DeltaDep,
    top_k: Annotated[int, Query(ge=1, le=100, description="number of results, 1–100")] = 5,
    category: Annotated[str | None, Query(description='restrict to this prdtypecode, or "unlabelled" (omit for all)',
                                          pattern=r"^([0-9]{1,9}|unlabelled)$")] = None,
):
    """The curated records whose images are most similar to this record's stored image embedding, best first; the
    record itself is left out. 404 for a record that is not in the served version (or an unknown category)."""
    snap = svc.snapshot()
    row = snap.corpus.row_of(record_id) if -(2**63) <= record_id < 2**63 else None
    delta.sync(snap)
    if row is None or record_id in delta.hidden():
        raise HTTPException(404, f"record {record_id} is not in curated version {snap.corpus.name}")
    category_ = check_category(snap, form_category(category))
    found = snap.corpus.index.search(snap.corpus.version.image_emb[row], overfetch(delta, top_k) + 1, category_)
    hidden = delta.hidden()
    found = [(r, s) for r, s in found if r != row]
    rows = [h for h in hits(settings, snap, found) if h["record_id"] not in hidden][:top_k]
    return versioned(rows, snap)
