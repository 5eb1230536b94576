"""Product images: only those the served version shows, nothing else under the images directory."""
from __future__ import annotations

import re
from pathlib import Path

from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse

from api.dependencies import DeltaDep, ServiceDep, SettingsDep
from api.errors import R404, R503

IMAGE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,200}\.(?:jpe?g|png|webp)$", re.IGNORECASE)
MEDIA_TYPES = {"jpg": "image/jpeg", "jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp"}

router = APIRouter()


@router.get(
    "/images/{file_name}",
    response_class=FileResponse,
    responses={
        200: {"content": {t: {"schema": {"type": "string", "format": "binary"}} for t in sorted(set(MEDIA_TYPES.values()))},
              "description": "the image"},
        **R404, **R503,
    },
)
def image(file_name: str, svc: ServiceDep, settings: SettingsDep, delta: DeltaDep):
    """A product image of the served curated version (or of the one served just before it), or of a row the served
    version's curation removed (the curation browser shows them); nothing else."""
    delta.sync(svc.snapshot())
    if not IMAGE_NAME_RE.match(file_name) or file_name in delta.hidden_images():
        raise HTTPException(404, "image not found")
    added = delta.image_path(file_name)  # a product added through the API: its inbox entry's image (always JPEG)
    if added is not None and added.is_file():
        return FileResponse(added, media_type="image/jpeg", headers={"X-Content-Type-Options": "nosniff"})
    for d in svc.image_dirs(file_name):
        path = safe_image_path(d, file_name)
        if path is not None:
            return FileResponse(path, media_type=MEDIA_TYPES[path.suffix.lower().lstrip(".")],
                                headers={"X-Content-Type-Options": "nosniff"})
    raise HTTPException(404, "image not found")


def safe_image_path(root: Path, file_name: str) -> Path | None:
    if not IMAGE_NAME_RE.match(file_name) or ".." in file_name:
        return None
    try:
        base = root.resolve(strict=True)
        path = (base / file_name).resolve(strict=True)
    except (OSError, RuntimeError):
        return None
    if path.parent != base or not path.is_file():
        return None
    return path
