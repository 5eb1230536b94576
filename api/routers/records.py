"""One curated record, and statistics of the served version."""
from __future__ import annotations

from fastapi import APIRouter, HTTPException

from api.dependencies import ServiceDep, SettingsDep, image_url, versioned
from api.errors import R404, R503
from api.schemas import Record, Stats

router = APIRouter()


@router.get("/record/{record_id}", response_model=Record, responses={**R404, **R503})
def record(record_id: int, svc: ServiceDep, settings: SettingsDep):
    """The full curated record."""
    snap = svc.snapshot()
    row = snap.corpus.row_of(record_id) if -(2**63) <= record_id < 2**63 else None
    if row is None:
        raise HTTPException(404, f"record {record_id} is not in curated version {snap.corpus.name}")
    rec = snap.corpus.rows([row])[0]
    out = {k: rec[k] for k in Record.model_fields if k in rec}
    out.update(image_url=image_url(settings, rec["image_file"]), version=snap.corpus.name)
    return versioned(Record(**out), snap)


@router.get("/stats", response_model=Stats, responses=R503)
def stats(svc: ServiceDep):
    """Corpus statistics of the version being served, and the last reload error if any."""
    snap = svc.snapshot()
    status = svc.status()
    out = dict(snap.corpus.stats)
    out.update(meaningless=bool(getattr(snap.encoder, "meaningless", False)), note=status.get("note"),
               text_encoder=status.get("text_encoder"), reload_error=status["reload_error"])
    return versioned(Stats(**out), snap)
