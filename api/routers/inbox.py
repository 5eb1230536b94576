"""Adding and deleting products (authenticated): POST /records, POST /records/batch, DELETE /records/{record_id}."""
from __future__ import annotations

import base64
import binascii
from typing import Annotated, Any

from fastapi import APIRouter, Depends, File, Form, HTTPException, Query, Security, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field

from api.dependencies import DecodeGateDep, DecoderDep, DeltaDep, ServiceDep, SettingsDep, image_url
from api.errors import R400, R404, R413, R415, R503, err
from api.inbox import NewProduct, require_writer
from api.service import BusyError, NotReadyError
from api.uploads import MULTIPART_OVERHEAD, too_large
from curation_dagster.core.inbox import ALLOCATED_ID_BASE

router = APIRouter(tags=["adding products"])

MAX_DESIGNATION_CHARS = 2000
MAX_DESCRIPTION_CHARS = 20000
_bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer <CURATION_API_WRITE_TOKEN>")
Credentials = Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)]


def writer(settings: SettingsDep, credentials: Credentials = None) -> None:
    """Declares the bearer scheme in OpenAPI and checks again; api.middleware.WriteAuthMiddleware has already
    refused an unauthenticated call before its body was received (FastAPI reads a body before dependencies run)."""
    require_writer(settings, credentials.credentials if credentials is not None else None)


def is_write_route(method: str, path: str) -> bool:
    """The routes of this module that change data (the middleware's test; GET never writes)."""
    return method in {"POST", "PUT", "PATCH", "DELETE"} and (path == "/records" or path.startswith("/records/"))

R_WRITE = {401: err("missing or wrong bearer token"),
           403: err("adding products is disabled (CURATION_API_WRITE_TOKEN is not set)")}
R_ADD = {**R_WRITE, 409: err("a near-duplicate (or the same productid) is already searchable; detail has "
                             "duplicate_of and the similarity"),
         422: err("unusable text, unknown prdtypecode, corrupt image, or image and text below the alignment "
                  "threshold of the class (detail has the score and the threshold)"),
         **R400, **R413, **R415, **R503, 507: err("the product could not be stored durably (disk)")}


class AddedProduct(BaseModel):
    record_id: int
    productid: int
    imageid: int
    designation: str
    description: str | None
    prdtypecode: int | None
    category: str | None
    image_file: str
    image_url: str
    alignment_score: float
    source: str = Field(description='"api"')
    added_at: str
    decisions: dict[str, Any] = Field(description="duplicate check and alignment decision, recorded either way")


class BatchItem(BaseModel):
    model_config = ConfigDict(strict=True)  # JSON types as documented: false is not a product type code

    image_base64: str = Field(description="the image file (JPEG, PNG or WebP), base64-encoded")
    designation: str = Field(max_length=MAX_DESIGNATION_CHARS)
    description: str | None = Field(None, max_length=MAX_DESCRIPTION_CHARS)
    prdtypecode: int | None = None
    productid: int | None = Field(None, ge=1, lt=ALLOCATED_ID_BASE)
    imageid: int | None = Field(None, ge=1, lt=2**63)


class Batch(BaseModel):
    items: list[BatchItem] = Field(min_length=1)


def _add(delta, svc, settings, decode_upload, gate, product: NewProduct, allow_duplicate: bool,
         allow_misaligned: bool) -> dict[str, Any]:
    snap = svc.snapshot()

    def decode(data: bytes):
        return decode_upload(data, max_pixels=settings.max_upload_pixels, target=max(224, snap.image_size), gate=gate)

    out = delta.add(snap, product, allow_duplicate=allow_duplicate, allow_misaligned=allow_misaligned,
                    decode=decode, gate=gate)
    return {**out, "image_url": image_url(settings, out["image_file"])}


@router.post("/records", status_code=201, response_model=AddedProduct, summary="Add a product", responses=R_ADD,
             dependencies=[Depends(writer)])
def add_record(
    svc: ServiceDep, settings: SettingsDep, delta: DeltaDep, decode_upload: DecoderDep, gate: DecodeGateDep,
    image: Annotated[UploadFile, File(description="the product image: JPEG, PNG or WebP")],
    designation: Annotated[str, Form(max_length=MAX_DESIGNATION_CHARS, description="the product title (cleaned like the pipeline's)")],
    description: Annotated[str | None, Form(max_length=MAX_DESCRIPTION_CHARS)] = None,
    prdtypecode: Annotated[int | None, Form(description="one of the known product type codes")] = None,
    productid: Annotated[int | None, Form(ge=1, lt=ALLOCATED_ID_BASE,
                                          description="your id, below 10^15 (default: allocated above it)")] = None,
    imageid: Annotated[int | None, Form(ge=1, lt=2**63)] = None,
    allow_duplicate: Annotated[bool, Query(description="add even if a near-duplicate is searchable")] = False,
    allow_misaligned: Annotated[bool, Query(description="add even if image and text match too little")] = False,
):
    """Checked by the pipeline's own rules, stored durably in the inbox before this answers 201, searchable at once,
    and part of the next curated version."""
    data = image.file.read(settings.max_upload_bytes + 1)
    if len(data) > settings.max_upload_bytes:
        raise HTTPException(413, too_large(settings.max_upload_bytes))
    product = NewProduct(image=data, designation=designation, description=description, prdtypecode=prdtypecode,
                         productid=productid, imageid=imageid)
    return _add(delta, svc, settings, decode_upload, gate, product, allow_duplicate, allow_misaligned)


@router.post("/records/batch", status_code=201, summary="Add several products",
             responses={**R_ADD, 207: {"description": "some items were refused: one result per item, in order"}},
             dependencies=[Depends(writer)])
async def add_records(
    body: Batch, svc: ServiceDep, settings: SettingsDep, delta: DeltaDep, decode_upload: DecoderDep,
    gate: DecodeGateDep,
    allow_duplicate: bool = False, allow_misaligned: bool = False,
):
    """Each item goes through the same checks as POST /records; one result per item (`status` 201 or the error)."""
    if len(body.items) > settings.max_batch_add:
        raise HTTPException(413, f"{len(body.items)} items is over the batch limit of {settings.max_batch_add} "
                                 "(CURATION_API_MAX_BATCH_ADD)")
    results: list[dict[str, Any]] = []
    for i, item in enumerate(body.items):
        if results and results[-1]["status"] == 503:  # the server is busy: do not wait again for each item
            results.extend({"status": 503, "detail": "not attempted: the server was busy with an earlier item of "
                                                     "this batch; send this item again"} for _ in body.items[i:])
            break
        try:
            data = base64.b64decode(item.image_base64, validate=True)
        except (binascii.Error, ValueError):
            results.append({"status": 422, "detail": "image_base64 is not valid base64"})
            continue
        if len(data) > settings.max_upload_bytes:
            results.append({"status": 413, "detail": too_large(settings.max_upload_bytes)})
            continue
        product = NewProduct(image=data, designation=item.designation, description=item.description,
                             prdtypecode=item.prdtypecode, productid=item.productid, imageid=item.imageid)
        try:
            added = await run_in_threadpool(_add, delta, svc, settings, decode_upload, gate, product,
                                            allow_duplicate, allow_misaligned)
            results.append({"status": 201, "record": added})
        except HTTPException as exc:
            results.append({"status": exc.status_code, "detail": exc.detail})
        except (NotReadyError, BusyError) as exc:  # earlier items are stored: the answer must still list them
            results.append({"status": 503, "detail": str(exc)})
    if all(r["status"] == 503 for r in results):  # nothing stored: the plain 503 (with Retry-After) says retry
        raise NotReadyError(results[0]["detail"])
    status = 201 if all(r["status"] == 201 for r in results) else 207
    return JSONResponse({"results": results}, status_code=status)


@router.delete("/records/{record_id:int}", status_code=200, summary="Delete a product added through the API",
               responses={**R_WRITE, **R404}, dependencies=[Depends(writer)])
def delete_record(record_id: int, svc: ServiceDep, delta: DeltaDep):
    """Removes it from search and record lookup at once (also when a published version already contains it) and
    leaves a tombstone the next pipeline run honours. Only products added through the API can be deleted here (the
    dataset is the source's)."""
    if not (-(2**63) <= record_id < 2**63) or not delta.delete(svc.snapshot(), record_id):
        raise HTTPException(404, f"no product {record_id} was added through the API (or it was deleted already)")
    return {"deleted": record_id}


def body_limits(max_upload_bytes: int, max_batch_add: int) -> tuple[int, int]:
    """The most bytes a valid POST /records and POST /records/batch body can take: the image(s) plus the longest
    text fields the routes accept (multipart carries UTF-8, up to 4 bytes per character; JSON may escape one
    character as two \\uXXXX escapes, 12 bytes), plus framing. Smaller would refuse valid requests with 413."""
    text = MAX_DESIGNATION_CHARS + MAX_DESCRIPTION_CHARS
    one = max_upload_bytes + 4 * text + MULTIPART_OVERHEAD
    batch = max_batch_add * (-(-max_upload_bytes // 3) * 4 + 12 * text + 1024) + MULTIPART_OVERHEAD
    return one, batch
