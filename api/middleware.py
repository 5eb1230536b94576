"""ASGI middleware: the write token and request body limits, both checked before a body is read."""
from __future__ import annotations

from typing import Callable

from fastapi import HTTPException
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send


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
        limit, message = self.overrides.get(route_path(scope), self.default)  # as routed: a prefix stripped
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


def bearer_token(scope: Scope) -> str | None:
    """The credentials of an ``Authorization: Bearer <token>`` header (scheme case-insensitive), else None."""
    for key, value in scope.get("headers", []):
        if key == b"authorization":
            scheme, _, credentials = value.decode("latin-1").strip().partition(" ")
            return (credentials.strip() or None) if scheme.lower() == "bearer" else None
    return None


def route_path(scope: Scope) -> str:
    """The path the router matches: behind a proxy prefix (``--root-path /api``) the ASGI path may carry the
    prefix, which routing strips (as Starlette's router does); a check on the raw path would miss every route."""
    path, root = scope["path"], scope.get("root_path", "").rstrip("/")
    if root and (path == root or path.startswith(root + "/")):
        return path[len(root):] or "/"
    return path


class WriteAuthMiddleware:
    """401/403 for a write route before its body is received.

    Why not only the route's dependency: FastAPI receives and parses a request's whole body before it runs the
    route's dependencies, so an unauthenticated client could make the server buffer and JSON-decode a batch body
    (hundreds of MB) just to be told 401. Here the token is checked on the headers alone.
    """

    def __init__(self, app: ASGIApp, is_write: Callable[[str, str], bool], check: Callable[[str | None], None]):
        self.app = app
        self.is_write = is_write
        self.check = check  # raises HTTPException (401/403) for a token that may not write

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.is_write(scope["method"], route_path(scope)):
            try:
                self.check(bearer_token(scope))
            except HTTPException as exc:
                await JSONResponse({"detail": exc.detail}, exc.status_code, headers=exc.headers)(scope, receive, send)
                return
        await self.app(scope, receive, send)
