"""Liveness and readiness."""
from __future__ import annotations

import os

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from api.dependencies import ServiceDep
from api.errors import NotReadyDetail, err
from api.schemas import Ready

router = APIRouter()


@router.get("/healthz")
def healthz():
    """The process is up (says nothing about data)."""
    return {"status": "ok"}


@router.get("/readyz", response_model=Ready,
            responses={503: err("no curated version loaded yet; `detail` says why", NotReadyDetail)})
def readyz(svc: ServiceDep):
    """Ready when a curated version and its encoder are loaded; reports version, model and reload errors."""
    status = svc.status()
    if not status["ready"]:
        return JSONResponse(
            {"detail": svc.not_ready_reason(), "status": "not ready", "version": None, "model": None,
             "reload_error": status["reload_error"]},
            status_code=503,
        )
    keys = ("version", "model", "device", "text_encoder", "meaningless", "note", "reload_error")
    return Ready(status="ready", pid=os.getpid(), **{k: status.get(k) for k in keys})
