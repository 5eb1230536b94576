"""FastAPI semantic search over the CURRENT curated version.

Run: ``uvicorn api.main:app --host 127.0.0.1 --port 8000``. Tests build their own app with ``create_app``.
Model inference and faiss run in the threadpool (sync endpoints), with bounded torch/faiss threads.
"""
from __future__ import annotations

import io
import logging
import os
import re
import time
import warnings
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.schemas import Ready, Record, SearchHit, SearchRequest, Stats
from api.service import EncoderLoader, NotReadyError, SearchService, Snapshot
from api.settings import ApiSettings
from curation_dagster.core.artifacts import images_dir

log = logging.getLogger("api")

_IMAGE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,200}\.(?:jpe?g|png|webp)$", re.IGNORECASE)
_MEDIA_TYPES = {"jpg": "image/jpeg", "jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp"}
_MULTIPART_OVERHEAD = 64 * 1024


class UploadLimitMiddleware:
    """413 for image uploads over the limit, before the multipart body is spooled to disk.

    Checks Content-Length up front and counts the bytes actually received (chunked uploads); the endpoint
    checks the file's exact size. The body may carry some multipart framing beyond the file itself.
    """

    def __init__(self, app: ASGIApp, path: str, max_bytes: int):
        self.app, self.path, self.max_body = app, path, max_bytes + _MULTIPART_OVERHEAD

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != self.path:
            await self.app(scope, receive, send)
            return
        for key, value in scope.get("headers", []):
            if key == b"content-length" and value.isdigit() and int(value) > self.max_body:
                await JSONResponse({"detail": _too_large(self.max_body - _MULTIPART_OVERHEAD)}, 413)(scope, receive, send)
                return
        seen = 0

        async def counting_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body:
                    raise HTTPException(413, _too_large(self.max_body - _MULTIPART_OVERHEAD))
            return message

        await self.app(scope, counting_receive, send)


def _too_large(limit: int) -> str:
    return f"image upload larger than the limit of {limit} bytes (CURATION_API_MAX_UPLOAD_BYTES)"


def create_app(settings: ApiSettings | None = None, *, encoder_loader: EncoderLoader | None = None) -> FastAPI:
    """Build the app; the curated version and the encoder are loaded by the lifespan handler."""
    settings = settings or ApiSettings.from_env()
    img_root = images_dir(settings.artifacts_dir)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        service = SearchService(settings, encoder_loader)
        await run_in_threadpool(service.start)
        app.state.service = service
        try:
            yield
        finally:
            await run_in_threadpool(service.close)

    app = FastAPI(
        title="Curated multimodal product search",
        description="Semantic text→image and image→image search over the CURRENT curated Rakuten catalogue version.",
        version="1.0",
        lifespan=lifespan,
    )
    app.add_middleware(UploadLimitMiddleware, path="/search/image", max_bytes=settings.max_upload_bytes)

    @app.exception_handler(NotReadyError)
    async def _not_ready(_: Request, exc: NotReadyError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=503, headers={"Retry-After": "10"})

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=exc)
        return JSONResponse({"detail": f"internal error: {type(exc).__name__}"}, status_code=500)

    def service(request: Request) -> SearchService:
        return request.app.state.service

    def base_url(request: Request) -> str:
        return settings.public_url or str(request.base_url).rstrip("/")

    def image_url(request: Request, image_file: str) -> str:
        return f"{base_url(request)}/images/{quote(image_file)}"

    def hits(request: Request, snap: Snapshot, found: list[tuple[int, float]]) -> list[dict[str, Any]]:
        rows = snap.corpus.rows([r for r, _ in found])
        return [
            {
                "record_id": rec["record_id"],
                "score": score,
                "image_url": image_url(request, rec["image_file"]),
                "designation": rec["designation"],
                "prdtypecode": rec["prdtypecode"],
                "category": rec["category"],
                "alignment_score": rec["alignment_score"],
            }
            for rec, (_, score) in zip(rows, found)
        ]

    def versioned(payload: Any, snap: Snapshot, timing: dict[str, float] | None = None) -> JSONResponse:
        """JSON response tagged with the curated version that answered it (and Server-Timing, in ms)."""
        headers = {"X-Curated-Version": snap.corpus.name}
        if timing:
            headers["Server-Timing"] = ", ".join(f"{k};dur={v * 1e3:.3f}" for k, v in timing.items())
        content = payload.model_dump(mode="json") if isinstance(payload, BaseModel) else payload
        return JSONResponse(content, headers=headers)

    @app.post("/search", response_model=list[SearchHit], summary="Text → image search")
    def search(body: SearchRequest, request: Request):
        """Top-k curated records for a text query; `score` is cosine(query, image embedding). Best first."""
        snap = service(request).snapshot()
        t0 = time.perf_counter()
        q = snap.encode_text(body.query.strip())
        t1 = time.perf_counter()
        found = snap.corpus.index.search(q, body.top_k, body.category)
        t2 = time.perf_counter()
        out = hits(request, snap, found)  # plain JSON types already: no second validation pass
        return versioned(out, snap, {"encode": t1 - t0, "search": t2 - t1, "records": time.perf_counter() - t2})

    @app.post(
        "/search/image",
        response_model=list[SearchHit],
        summary="Image → image search",
        responses={413: {"description": "upload too large"}, 415: {"description": "not an image"}},
    )
    def search_image(
        request: Request,
        file: Annotated[UploadFile, File(description="a JPEG/PNG/WebP/... image")],
        top_k: Annotated[int, Form(ge=1, le=100)] = 5,
        category: Annotated[int | None, Form()] = None,
    ):
        """The curated records whose images are most similar to the uploaded one."""
        data = file.file.read(settings.max_upload_bytes + 1)
        if len(data) > settings.max_upload_bytes:
            raise HTTPException(413, _too_large(settings.max_upload_bytes))
        image = _decode_image(data)
        snap = service(request).snapshot()
        q = snap.encode_image(image)
        found = snap.corpus.index.search(q, top_k, category)
        return versioned(hits(request, snap, found), snap)

    @app.get("/record/{record_id}", response_model=Record, responses={404: {"description": "unknown record"}})
    def record(record_id: int, request: Request):
        """The full curated record."""
        snap = service(request).snapshot()
        row = snap.corpus.row_of(record_id) if -(2**63) <= record_id < 2**63 else None
        if row is None:
            raise HTTPException(404, f"record {record_id} is not in curated version {snap.corpus.name}")
        rec = snap.corpus.rows([row])[0]
        out = {k: rec[k] for k in Record.model_fields if k in rec}
        out.update(image_url=image_url(request, rec["image_file"]), version=snap.corpus.name)
        return versioned(Record(**out), snap)

    @app.get("/stats", response_model=Stats)
    def stats(request: Request):
        """Corpus statistics of the version being served, and the last reload error if any."""
        svc = service(request)
        snap = svc.snapshot()
        status = svc.status()
        out = dict(snap.corpus.stats)
        out.update(meaningless=bool(getattr(snap.encoder, "meaningless", False)), note=status.get("note"),
                   text_encoder=status.get("text_encoder"), reload_error=status["reload_error"])
        return versioned(Stats(**out), snap)

    @app.get("/images/{file_name}", response_class=FileResponse, responses={404: {"description": "no such image"}})
    def image(file_name: str):
        """A collected product image; nothing outside the images directory is reachable."""
        path = _safe_image_path(img_root, file_name)
        if path is None:
            raise HTTPException(404, "image not found")
        return FileResponse(path, media_type=_MEDIA_TYPES[path.suffix.lower().lstrip(".")])

    @app.get("/healthz")
    def healthz():
        """The process is up (says nothing about data)."""
        return {"status": "ok"}

    @app.get("/readyz", response_model=Ready, responses={503: {"description": "no curated version loaded yet"}})
    def readyz(request: Request):
        """Ready when a curated version and its encoder are loaded; reports version, model and reload errors."""
        svc = service(request)
        status = svc.status()
        if not status["ready"]:
            return JSONResponse(
                {"detail": svc.not_ready_reason(), "status": "not ready", "version": None, "model": None,
                 "reload_error": status["reload_error"]},
                status_code=503,
            )
        keys = ("version", "model", "device", "text_encoder", "meaningless", "note", "reload_error")
        return Ready(status="ready", pid=os.getpid(), **{k: status.get(k) for k in keys})

    return app


def _decode_image(data: bytes) -> Image.Image:
    """Decode the whole upload (not just the header); 415 when it is not an image, 413 for pixel bombs."""
    if not data:
        raise HTTPException(415, "the upload is empty, not an image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            img.load()
        return img.convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise HTTPException(413, f"image has too many pixels: {exc}") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise HTTPException(415, f"the upload is not a readable image: {exc}") from exc


def _safe_image_path(root: Path, file_name: str) -> Path | None:
    if not _IMAGE_NAME_RE.match(file_name) or ".." in file_name:
        return None
    try:
        base = root.resolve(strict=True)
        path = (base / file_name).resolve(strict=True)
    except (OSError, RuntimeError):
        return None
    if path.parent != base or not path.is_file():
        return None
    return path


app = create_app()
