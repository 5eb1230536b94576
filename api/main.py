"""FastAPI semantic search over the CURRENT curated version.

Run: ``uvicorn api.main:app --host 127.0.0.1 --port 8000``. Tests build their own app with ``create_app``.
Model inference and faiss run in the threadpool (sync endpoints), with bounded torch/faiss threads.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import io
import logging
import math
import os
import re
import struct
import threading
import time
import warnings
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any, Callable, Sequence
from urllib.parse import quote

from fastapi import FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.schemas import UNLABELLED, Ready, Record, SearchHit, SearchRequest, Stats
from api.service import EncoderLoader, NotReadyError, SearchService, Snapshot
from api.settings import ApiSettings
from curation_dagster.core.artifacts import images_dir

log = logging.getLogger("api")

_IMAGE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,200}\.(?:jpe?g|png|webp)$", re.IGNORECASE)
_MEDIA_TYPES = {"jpg": "image/jpeg", "jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp"}
_MULTIPART_OVERHEAD = 64 * 1024
UPLOAD_PATH = "/search/image"
# Decoded image formats accepted for an image query. Pillow would otherwise also open EPS/PS (through Ghostscript),
# PDF, TIFF, ... : a stated allowlist keeps those decoders (and their bugs) out of reach.
UPLOAD_FORMATS = ("JPEG", "PNG", "WEBP")
_NOT_AN_IMAGE = "the upload is not a readable image: accepted formats are JPEG, PNG and WebP"
_CORRUPT = "the upload is not a readable image: the JPEG, PNG or WebP data is truncated or corrupt"
_DECODE_WAIT_S = 30.0
_TRIM_ABOVE_PIXELS = 2_000_000  # give freed decode buffers back to the OS after decoding an image this large
_ECHO_CHARS = 120  # longest string echoed back in a 422
_ECHO_ITEMS = 10  # most list items / dict entries echoed back in a 422
_MAX_ERRORS = 20


class BodyTooLarge(HTTPException):
    def __init__(self, detail: str):
        super().__init__(413, detail)


class BodyLimitMiddleware:
    """413 for any request body over its route's limit, before it is parsed or spooled to disk.

    Every route gets ``max_bytes`` (JSON bodies are small) except those in ``overrides`` (the image upload).
    Checks Content-Length up front and counts the bytes actually received (chunked bodies); the upload
    endpoint also checks the file's exact size (a multipart body carries some framing beyond the file).
    """

    def __init__(self, app: ASGIApp, max_bytes: int, overrides: dict[str, tuple[int, str]] | None = None):
        self.app = app
        self.default = (max_bytes, f"request body larger than the limit of {max_bytes} bytes (CURATION_API_MAX_BODY_BYTES)")
        self.overrides = overrides or {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit, message = self.overrides.get(scope["path"], self.default)
        for key, value in scope.get("headers", []):
            if key == b"content-length" and value.isdigit() and int(value) > limit:
                await JSONResponse({"detail": message}, 413)(scope, receive, send)
                return
        seen = 0

        async def counting_receive() -> Message:
            nonlocal seen
            message_ = await receive()
            if message_["type"] == "http.request":
                seen += len(message_.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge(message)
            return message_

        await self.app(scope, counting_receive, send)


def _too_large(limit: int) -> str:
    return f"image upload larger than the limit of {limit} bytes (CURATION_API_MAX_UPLOAD_BYTES)"


# ----------------------------------------------------------------------------------------- 422 without echoing input


def _safe_str(text: str, limit: int = _ECHO_CHARS) -> str:
    """Printable, JSON- and UTF-8-safe, bounded: lone surrogates become U+FFFD, long text is cut."""
    out = text[:limit].encode("utf-8", "replace").decode("utf-8").replace("?", "?")
    out = "".join("\ufffd" if 0xD800 <= ord(c) <= 0xDFFF else c for c in text[:limit])
    return out if len(text) <= limit else f"{out}… ({len(text)} characters)"


def _safe_value(value: Any, depth: int = 0) -> Any:
    """What a 422 may echo of the client's input: bounded in size and depth, valid JSON (no NaN, no surrogates)."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value if -(2**63) <= value < 2**63 else f"<integer of {value.bit_length()} bits>"
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, str):
        return _safe_str(value)
    if isinstance(value, (bytes, bytearray)):
        return _safe_str(bytes(value[: _ECHO_CHARS * 4]).decode("utf-8", "replace")) if len(value) <= _ECHO_CHARS \
            else f"<{len(value)} bytes>"
    if depth >= 3:
        return "…"
    if isinstance(value, dict):
        items = list(value.items())
        out = {_safe_str(str(k), 60): _safe_value(v, depth + 1) for k, v in items[:_ECHO_ITEMS]}
        if len(items) > _ECHO_ITEMS:
            out["…"] = f"{len(items) - _ECHO_ITEMS} more entries"
        return out
    if isinstance(value, (list, tuple)):
        out_list = [_safe_value(v, depth + 1) for v in list(value[:_ECHO_ITEMS])]
        if len(value) > _ECHO_ITEMS:
            out_list.append(f"… {len(value) - _ECHO_ITEMS} more items")
        return out_list
    if isinstance(value, BaseException):
        return _safe_str(str(value))
    return _safe_str(type(value).__name__)  # never a repr: it may carry memory addresses


def safe_validation_errors(errors: Sequence[Any]) -> list[dict[str, Any]]:
    out = []
    for err in list(errors)[:_MAX_ERRORS]:
        item: dict[str, Any] = {
            "type": _safe_str(str(err.get("type", "value_error")), 60),
            "loc": [x if isinstance(x, int) and not isinstance(x, bool) else _safe_str(str(x), 60)
                    for x in list(err.get("loc", ()))[:10]],
            "msg": _safe_str(str(err.get("msg", "")), 300),
        }
        if "input" in err:
            item["input"] = _safe_value(err["input"])
        if isinstance(err.get("ctx"), dict):
            item["ctx"] = _safe_value(err["ctx"])
        out.append(item)
    return out


class ErrorDetail(BaseModel):
    """Every error: `{"detail": ...}` (a message, or for 422 the list of validation errors)."""

    detail: Any


class NotReadyDetail(BaseModel):
    detail: str
    status: str
    version: str | None = None
    model: str | None = None
    reload_error: dict[str, Any] | None = None


def _err(description: str, model: type[BaseModel] = ErrorDetail) -> dict[str, Any]:
    return {"model": model, "description": description}


R400 = {400: _err("the request body could not be parsed")}
R404 = {404: _err("not found")}
R404_CATEGORY = {404: _err("unknown category: the detail lists the known ones")}
R413 = {413: _err("request body (or uploaded image) too large")}
R415 = {415: _err("the upload is not a readable JPEG, PNG or WebP image")}
R503 = {503: _err("no curated version loaded yet (the reason says what to run), or the server is busy")}


def create_app(settings: ApiSettings | None = None, *, encoder_loader: EncoderLoader | None = None) -> FastAPI:
    """Build the app; the curated version and the encoder are loaded by the lifespan handler."""
    settings = settings or ApiSettings.from_env()
    img_root = images_dir(settings.artifacts_dir)
    decode_gate = threading.BoundedSemaphore(max(1, settings.max_concurrent_decodes))

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
        description="Semantic text→image and image→image search over the CURRENT curated Rakuten catalogue version. "
                    "Errors are `{\"detail\": ...}`.",
        version="1.0",
        lifespan=lifespan,
    )
    app.add_middleware(
        BodyLimitMiddleware,
        max_bytes=settings.max_body_bytes,
        overrides={UPLOAD_PATH: (settings.max_upload_bytes + _MULTIPART_OVERHEAD, _too_large(settings.max_upload_bytes))},
    )

    @app.exception_handler(NotReadyError)
    async def _not_ready(_: Request, exc: NotReadyError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=503, headers={"Retry-After": "10"})

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's default handler echoes the whole input back (a 200 MB body, NaN, lone surrogates → 500).
        return JSONResponse({"detail": safe_validation_errors(exc.errors())}, status_code=422)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=exc)
        return JSONResponse({"detail": f"internal error: {type(exc).__name__}"}, status_code=500)

    def service(request: Request) -> SearchService:
        return request.app.state.service

    def image_url(image_file: str) -> str:
        # Never from the request's Host header: relative unless a public base URL is configured.
        return f"{settings.public_url or ''}/images/{quote(image_file)}"

    def hits(snap: Snapshot, found: list[tuple[int, float]]) -> list[dict[str, Any]]:
        rows = snap.corpus.rows([r for r, _ in found])
        return [
            {
                "record_id": rec["record_id"],
                "score": score,
                "image_url": image_url(rec["image_file"]),
                "designation": rec["designation"],
                "prdtypecode": rec["prdtypecode"],
                "category": rec["category"],
                "alignment_score": rec["alignment_score"],
            }
            for rec, (_, score) in zip(rows, found)
        ]

    def check_category(snap: Snapshot, category: int | str | None) -> int | str | None:
        """404 for a category filter that names no category this service knows (an empty 200 would read as "no
        match"); any integer is a well-formed filter, so it is the category that is not found, not the request
        that is malformed."""
        why = snap.corpus.unknown_category(category)
        if why:
            raise HTTPException(404, why)
        return category

    def versioned(payload: Any, snap: Snapshot, timing: dict[str, float] | None = None) -> JSONResponse:
        """JSON response tagged with the curated version that answered it (and Server-Timing, in ms)."""
        headers = {"X-Curated-Version": snap.corpus.name}
        if timing:
            headers["Server-Timing"] = ", ".join(f"{k};dur={v * 1e3:.3f}" for k, v in timing.items())
        content = payload.model_dump(mode="json") if isinstance(payload, BaseModel) else payload
        return JSONResponse(content, headers=headers)

    @app.post("/search", response_model=list[SearchHit], summary="Text → image search",
              responses={**R400, **R404_CATEGORY, **R413, **R503})
    def search(body: SearchRequest, request: Request):
        """Top-k curated records for a text query; `score` is cosine(query, image embedding). Best first."""
        snap = service(request).snapshot()
        check_category(snap, body.category)
        t0 = time.perf_counter()
        q = snap.encode_text(body.query.strip())
        t1 = time.perf_counter()
        found = snap.corpus.index.search(q, body.top_k, body.category)
        t2 = time.perf_counter()
        out = hits(snap, found)  # plain JSON types already: no second validation pass
        return versioned(out, snap, {"encode": t1 - t0, "search": t2 - t1, "records": time.perf_counter() - t2})

    @app.post(
        UPLOAD_PATH,
        response_model=list[SearchHit],
        summary="Image → image search",
        responses={**R400, **R404_CATEGORY, **R413, **R415, **R503},
    )
    def search_image(
        request: Request,
        file: Annotated[UploadFile, File(description="a JPEG, PNG or WebP image")],
        top_k: Annotated[int, Form(ge=1, le=100)] = 5,
        category: Annotated[str, Form(description='restrict to this prdtypecode, or "unlabelled" (omit for all)',
                                      pattern=r"^([0-9]{1,9}|unlabelled)$")] = None,  # type: ignore[assignment]
    ):
        """The curated records whose images are most similar to the uploaded one."""
        data = file.file.read(settings.max_upload_bytes + 1)
        if len(data) > settings.max_upload_bytes:
            raise HTTPException(413, _too_large(settings.max_upload_bytes))
        snap = service(request).snapshot()
        category = check_category(snap, None if category is None else
                                  (category if category == UNLABELLED else int(category)))
        image = decode_upload(data, max_pixels=settings.max_upload_pixels, target=max(224, snap.image_size),
                              gate=decode_gate)
        del data
        q = snap.encode_image(image)
        found = snap.corpus.index.search(q, top_k, category)
        return versioned(hits(snap, found), snap)

    @app.get("/record/{record_id}", response_model=Record, responses={**R404, **R503})
    def record(record_id: int, request: Request):
        """The full curated record."""
        snap = service(request).snapshot()
        row = snap.corpus.row_of(record_id) if -(2**63) <= record_id < 2**63 else None
        if row is None:
            raise HTTPException(404, f"record {record_id} is not in curated version {snap.corpus.name}")
        rec = snap.corpus.rows([row])[0]
        out = {k: rec[k] for k in Record.model_fields if k in rec}
        out.update(image_url=image_url(rec["image_file"]), version=snap.corpus.name)
        return versioned(Record(**out), snap)

    @app.get("/stats", response_model=Stats, responses=R503)
    def stats(request: Request):
        """Corpus statistics of the version being served, and the last reload error if any."""
        svc = service(request)
        snap = svc.snapshot()
        status = svc.status()
        out = dict(snap.corpus.stats)
        out.update(meaningless=bool(getattr(snap.encoder, "meaningless", False)), note=status.get("note"),
                   text_encoder=status.get("text_encoder"), reload_error=status["reload_error"])
        return versioned(Stats(**out), snap)

    @app.get(
        "/images/{file_name}",
        response_class=FileResponse,
        responses={
            200: {"content": {t: {"schema": {"type": "string", "format": "binary"}} for t in sorted(set(_MEDIA_TYPES.values()))},
                  "description": "the image"},
            **R404, **R503,
        },
    )
    def image(file_name: str, request: Request):
        """A product image of the served curated version (or of the one served just before it); nothing else."""
        if not _IMAGE_NAME_RE.match(file_name) or not service(request).image_allowed(file_name):
            raise HTTPException(404, "image not found")
        path = _safe_image_path(img_root, file_name)
        if path is None:
            raise HTTPException(404, "image not found")
        return FileResponse(path, media_type=_MEDIA_TYPES[path.suffix.lower().lstrip(".")])

    @app.get("/healthz")
    def healthz():
        """The process is up (says nothing about data)."""
        return {"status": "ok"}

    @app.get("/readyz", response_model=Ready,
             responses={503: _err("no curated version loaded yet; `detail` says why", NotReadyDetail)})
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


def _load_malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim (hands freed heap pages back to the OS); None where libc has none (musl, macOS)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        fn = getattr(libc, "malloc_trim", None)
    except (OSError, AttributeError):
        return None
    if fn is not None:
        fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
    return fn


_MALLOC_TRIM = _load_malloc_trim()


def release_memory() -> None:
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def decode_upload(data: bytes, *, max_pixels: int, target: int = 224,
                  gate: threading.Semaphore | None = None) -> Image.Image:
    """Decode an uploaded JPEG/PNG/WebP into a small RGB image: 415 when it is not one, 413 for too many pixels.

    Memory is bounded before anything is decoded: the pixel count comes from the header (for JPEG after choosing
    a reduced DCT scale, ``draft``); decoding then happens under ``gate`` (a few at a time), and the image is
    shrunk at once to what the model needs (shortest side ``2 * target``; the model's own preprocessing resizes
    further). After a large decode, freed memory is handed back to the OS.
    """
    if not data:
        raise HTTPException(415, "the upload is empty, not an image")
    pixels = 0
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=UPLOAD_FORMATS)
            if img.format == "JPEG":
                img.draft("RGB", (2 * target, 2 * target))  # decode at 1/2, 1/4 or 1/8 scale where that suffices
            width, height = img.size
            pixels = width * height
            if pixels > max_pixels:
                raise HTTPException(413, f"image of {width}x{height} = {pixels} pixels is over the limit of {max_pixels} "
                                         "pixels (CURATION_API_MAX_UPLOAD_PIXELS)")
            if gate is not None and not gate.acquire(timeout=_DECODE_WAIT_S):
                raise NotReadyError("too many image uploads are being decoded; retry shortly")
            try:
                img.load()
                return _shrink(img, 2 * target).convert("RGB")
            finally:
                del img
                if gate is not None:
                    gate.release()
    except (HTTPException, NotReadyError):
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise HTTPException(413, "image has too many pixels (over the decompression-bomb limit)") from None
    except UnidentifiedImageError:
        raise HTTPException(415, _NOT_AN_IMAGE) from None
    except (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError, TypeError, KeyError):
        raise HTTPException(415, _CORRUPT) from None
    finally:
        if pixels > _TRIM_ABOVE_PIXELS:
            release_memory()


def _shrink(img: Image.Image, short_side: int) -> Image.Image:
    """The image with its shortest side reduced to ``short_side`` (unchanged when already that small)."""
    width, height = img.size
    short = min(width, height)
    if short <= short_side:
        return img
    if img.mode in ("1", "P", "PA", "I;16", "I;16B", "I;16L", "I", "F"):  # modes Pillow resizes poorly or not at all
        img = img.convert("RGBA" if "A" in img.mode or "transparency" in img.info else "RGB" if img.mode == "P" else "L")
    scale = short_side / short
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return img.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)


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
