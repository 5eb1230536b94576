"""FastAPI semantic search over the CURRENT curated version, and the pages that use it.

Run: ``uvicorn api.main:app --host 127.0.0.1 --port 8000``. Tests build their own app with ``create_app``.
Model inference runs on bounded threads: text queries on the service's batcher (``POST /search`` awaits it),
image uploads and the other endpoints in the threadpool (sync endpoints), with bounded torch/faiss threads.

Layout: ``create_app`` builds the app and wires middleware, exception handlers and routers; the routes live in
``api/routers/`` (search, records, images, health, curation, pages), what they share in ``api/dependencies.py``,
error shapes in ``api/errors.py``, image-upload decoding in ``api/uploads.py``, the pages in ``api/static/``.
"""
from __future__ import annotations

import gc
import threading
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError

from api import uploads
from api.errors import busy_handler, not_ready_handler, safe_validation_errors, unexpected_handler, validation_handler  # noqa: F401
from api.inbox import InboxDelta, require_writer
from api.middleware import BodyLimitMiddleware, WriteAuthMiddleware
from api.routers import curation, health, images, inbox, pages, records, search
from api.service import BusyError, EncoderLoader, NotReadyError, SearchService
from api.settings import ApiSettings
# Defined here before the split into modules; kept importable from api.main.
from api.uploads import UPLOAD_PATH, _shrink, decode_upload, release_memory  # noqa: F401


def _decode_upload(data: bytes, **kwargs: Any):
    """uploads.decode_upload with this module's ``_shrink`` looked up at call time (tests patch api.main._shrink)."""
    return uploads.decode_upload(data, shrink=_shrink, **kwargs)


_frozen_apps = 0  # apps serving in this process with the heap frozen (gc.freeze is process-wide)
_freeze_lock = threading.Lock()


def _freeze_heap() -> None:
    global _frozen_apps
    with _freeze_lock:
        gc.collect()
        gc.freeze()
        _frozen_apps += 1


def _thaw_heap() -> None:
    """Unfreeze when the LAST serving app stops: a second app in the process (tests, an embedding host that
    mounts two) keeps its start-up heap out of the collector while it still serves."""
    global _frozen_apps
    with _freeze_lock:
        _frozen_apps = max(0, _frozen_apps - 1)
        if _frozen_apps == 0:
            gc.unfreeze()  # a process that builds apps again gets them collectable again


def create_app(settings: ApiSettings | None = None, *, encoder_loader: EncoderLoader | None = None) -> FastAPI:
    """Build the app; the curated version and the encoder are loaded by the lifespan handler."""
    settings = settings or ApiSettings.from_env()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        service = SearchService(settings, encoder_loader)
        await run_in_threadpool(service.start)
        app.state.service = service
        app.state.delta = InboxDelta(settings)
        if service.status()["ready"]:  # replay the inbox now, not on the first request
            await run_in_threadpool(app.state.delta.sync, service.snapshot())
        # The start-up heap (model, tokenizer, corpus: long-lived) leaves the cyclic collector's view. A full
        # collection walks every tracked object; with a ViT-B/32 loaded that measured 90-250 ms per pass during
        # start-up, a pause every in-flight request would wait out if one came under load.
        _freeze_heap()
        try:
            yield
        finally:
            try:
                await run_in_threadpool(service.close)
            finally:
                _thaw_heap()

    app = FastAPI(
        title="Curated multimodal product search",
        description="Semantic text→image and image→image search over the CURRENT curated Rakuten catalogue version. "
                    "Errors are `{\"detail\": ...}`. The search page is at `/`, the curation browser at `/curation`.",
        version="1.0",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.decode_upload = _decode_upload
    app.state.decode_gate = threading.BoundedSemaphore(max(1, settings.max_concurrent_decodes))
    add_one_limit, add_batch_limit = inbox.body_limits(settings.max_upload_bytes, settings.max_batch_add)
    app.add_middleware(
        BodyLimitMiddleware,
        max_bytes=settings.max_body_bytes,
        overrides={UPLOAD_PATH: (settings.max_upload_bytes + uploads.MULTIPART_OVERHEAD,
                                 uploads.too_large(settings.max_upload_bytes)),
                   "/records": (add_one_limit, uploads.too_large(settings.max_upload_bytes)),
                   "/records/batch": (add_batch_limit, f"a batch is at most {settings.max_batch_add} images of "
                                                       f"{settings.max_upload_bytes} bytes each")},
    )
    # Added last = outermost: an unauthenticated write is refused before the body limit or FastAPI reads anything.
    app.add_middleware(WriteAuthMiddleware, is_write=inbox.is_write_route,
                       check=lambda token: require_writer(settings, token))
    app.add_exception_handler(NotReadyError, not_ready_handler)
    app.add_exception_handler(BusyError, busy_handler)
    app.add_exception_handler(RequestValidationError, validation_handler)
    app.add_exception_handler(Exception, unexpected_handler)
    for router in (search.router, records.router, inbox.router, images.router, health.router, curation.router,
                   pages.router):
        app.include_router(router)
    return app


app = create_app()
