"""Error shapes: `{"detail": ...}` models and their OpenAPI docs, the exception handlers, and a 422 that never echoes
the client's input unbounded (no 200 MB body, NaN or lone surrogate coming back)."""
from __future__ import annotations

import logging
import math
from typing import Any, Sequence

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from api.service import BusyError, NotReadyError

log = logging.getLogger("api")

_ECHO_CHARS = 120  # longest string echoed back in a 422
_ECHO_ITEMS = 10  # most list items / dict entries echoed back in a 422
_MAX_ERRORS = 20


class ErrorDetail(BaseModel):
    """Every error: `{"detail": ...}` (a message, or for 422 the list of validation errors)."""

    detail: Any


class NotReadyDetail(BaseModel):
    detail: str
    status: str
    version: str | None = None
    model: str | None = None
    reload_error: dict[str, Any] | None = None


def err(description: str, model: type[BaseModel] = ErrorDetail) -> dict[str, Any]:
    return {"model": model, "description": description}


R400 = {400: err("the request body could not be parsed")}
R404 = {404: err("not found")}
R404_CATEGORY = {404: err("unknown category: the detail lists the known ones")}
R413 = {413: err("request body (or uploaded image) too large")}
R415 = {415: err("the upload is not a readable JPEG, PNG or WebP image")}
R503 = {503: err("no curated version loaded yet (the reason says what to run), or the server is busy")}


# ----------------------------------------------------------------------------------------- 422 without echoing input


def _safe_str(text: str, limit: int = _ECHO_CHARS) -> str:
    """Printable, JSON- and UTF-8-safe, bounded: lone surrogates become U+FFFD, long text is cut."""
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
    for e in list(errors)[:_MAX_ERRORS]:
        item: dict[str, Any] = {
            "type": _safe_str(str(e.get("type", "value_error")), 60),
            "loc": [x if isinstance(x, int) and not isinstance(x, bool) else _safe_str(str(x), 60)
                    for x in list(e.get("loc", ()))[:10]],
            "msg": _safe_str(str(e.get("msg", "")), 300),
        }
        if "input" in e:
            item["input"] = _safe_value(e["input"])
        if isinstance(e.get("ctx"), dict):
            item["ctx"] = _safe_value(e["ctx"])
        out.append(item)
    return out


# ------------------------------------------------------------------------------------------------ exception handlers


async def not_ready_handler(_: Request, exc: NotReadyError) -> JSONResponse:
    return JSONResponse({"detail": str(exc)}, status_code=503, headers={"Retry-After": "10"})


async def busy_handler(_: Request, exc: BusyError) -> JSONResponse:
    return JSONResponse({"detail": str(exc)}, status_code=503, headers={"Retry-After": "1"})


async def validation_handler(_: Request, exc: RequestValidationError) -> JSONResponse:
    # FastAPI's default handler echoes the whole input back (a 200 MB body, NaN, lone surrogates → 500).
    return JSONResponse({"detail": safe_validation_errors(exc.errors())}, status_code=422)


async def unexpected_handler(_: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error", exc_info=exc)
    return JSONResponse({"detail": f"internal error: {type(exc).__name__}"}, status_code=500)
