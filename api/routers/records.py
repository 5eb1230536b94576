"""One curated record, and statistics of the served version."""
from __future__ import annotations

from fastapi import APIRouter, HTTPException

from api.dependencies import DeltaDep, ServiceDep, SettingsDep, image_url, versioned
from api.errors import R404, R503
from api.schemas import Record, Stats

router = APIRouter()


@router.get("/record/{record_id}", response_model=Record, responses={**R404, **R503})
def record(record_id: int, svc: ServiceDep, settings: SettingsDep, delta: DeltaDep):
    """The full curated record (or a product added through the API and not yet in a published version)."""
    snap = svc.snapshot()
    row = snap.corpus.row_of(record_id) if -(2**63) <= record_id < 2**63 else None
    delta.sync(snap)
    if row is not None and record_id in delta.hidden():  # deleted since this version was published
        row = None
    if row is None:
        rec = delta.get(record_id) if -(2**63) <= record_id < 2**63 else None
        if rec is None:
            raise HTTPException(404, f"record {record_id} is not in curated version {snap.corpus.name}")
    else:
        rec = snap.corpus.rows([row])[0]
    out = {k: rec[k] for k in Record.model_fields if k in rec}
    out.update(image_url=image_url(settings, rec["image_file"]), version=snap.corpus.name)
    return versioned(Record(**out), snap)


@router.get("/stats", response_model=Stats, responses=R503)
def stats(svc: ServiceDep, delta: DeltaDep):
    """Corpus statistics of the version being served, the products added since (inbox), the last reload error."""
    snap = svc.snapshot()
    status = svc.status()
    delta.sync(snap)
    out = dict(snap.corpus.stats)
    out["inbox"] = delta.count()
    if out["inbox"]:
        dist = dict(out["label_distribution"])
        for k, v in delta.labels().items():
            dist[k] = dist.get(k, 0) + v
        out["label_distribution"] = dist
    out.update(meaningless=bool(getattr(snap.encoder, "meaningless", False)), note=status.get("note"),
               text_encoder=status.get("text_encoder"), reload_error=status["reload_error"],
               query_queue=snap.batcher.stats())
    return versioned(Stats(**out), snap)
