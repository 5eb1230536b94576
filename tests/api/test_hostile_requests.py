"""Requests an attacker or an unlucky client sends, found by an adversarial review (2026-11-29): each test failed on
the code before its fix."""
from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from api_helpers import HashEncoder, build_sample_artifact, make_settings
from pipeline_helpers import many_scans_jpeg
from fastapi.testclient import TestClient
from PIL import Image

from api.main import create_app
from curation_dagster.core.artifacts import REMOVALS_FILE, load_version

TOKEN = "s3cret-token-for-tests"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def small_art(tmp_path):
    d = tmp_path / "artifacts"
    build_sample_artifact(d, HashEncoder(), rows=60)
    return d


def _app(art, **kw):
    return create_app(make_settings(art, **kw), encoder_loader=lambda m, dev: HashEncoder())


def _noise_jpeg(size: int, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray((rng.random((size, size, 3)) * 255).astype(np.uint8)).save(buf, "JPEG", quality=95)
    return buf.getvalue()


# ------------------------------------------------------------------------------------ 1. body limit behind root_path


def test_upload_limit_override_applies_behind_a_proxy_prefix(small_art):
    """uvicorn --root-path /api puts the prefix into scope["path"]; the upload limit override is keyed on the bare
    route path, so behind the prefix every upload over 64 KiB (CURATION_API_MAX_BODY_BYTES) is refused with 413."""
    data = _noise_jpeg(256)
    assert 64 * 1024 < len(data) < 200_000  # over the JSON body limit, under the upload limit (make_settings)
    with TestClient(_app(small_art)) as c:  # no prefix: accepted
        assert c.post("/search/image", files={"file": ("q.jpg", data, "image/jpeg")}).status_code == 200
    with TestClient(_app(small_art), root_path="/api") as c:
        r = c.post("/api/search/image", files={"file": ("q.jpg", data, "image/jpeg")})
        assert r.status_code == 200, (r.status_code, r.text)


# ------------------------------------------------------------------------------------ 2. removals error leaks a path


def test_removals_read_error_does_not_leak_server_paths(small_art, monkeypatch):
    """An unreadable removals.parquet (polars: 'Permission denied (os error 13): <absolute path>') is shown
    verbatim in /curation/removals' note; every other load error shown to clients goes through redact_paths."""
    import polars as pl

    version = load_version(small_art)
    path = version.path / REMOVALS_FILE
    path.write_bytes(b"PAR1")
    real = pl.read_parquet

    def read_parquet(source, *a, **k):
        if str(source).endswith(REMOVALS_FILE):  # what polars says when the API's user may not read the file
            raise PermissionError(f"Permission denied (os error 13): {source}")
        return real(source, *a, **k)

    monkeypatch.setattr(pl, "read_parquet", read_parquet)
    with TestClient(_app(small_art)) as c:
        r = c.get("/curation/removals")
    assert r.status_code == 200
    assert str(small_art) not in r.text, r.json()["note"]


# ------------------------------------------------------------------------------------ 3. batch: partial success lost


def test_batch_reports_the_items_it_stored_when_a_later_item_hits_the_decode_gate(small_art, monkeypatch):
    """POST /records/batch catches only HTTPException per item; the decode gate's NotReadyError (no slot within
    _DECODE_WAIT_S = 30 s) on item 2 turns the whole response into 503, although item 1 was stored durably (201).
    A client that retries the batch then gets 409 for item 1."""
    import api.uploads

    monkeypatch.setattr(api.uploads, "_DECODE_WAIT_S", 0.2)
    app = _app(small_art, write_token=TOKEN, max_concurrent_decodes=1)
    real, gate, calls = app.state.decode_upload, app.state.decode_gate, []

    def decode(data, **kw):  # the real decoder; while item 2 is decoded another upload holds the only slot
        calls.append(1)
        if len(calls) != 2:
            return real(data, **kw)
        gate.acquire()
        try:
            return real(data, **kw)
        finally:
            gate.release()

    app.state.decode_upload = decode
    items = [{"image_base64": base64.b64encode(_noise_jpeg(64, seed=i)).decode(),
              "designation": f"Tente de camping modele {i} impermeable"} for i in (1, 2, 3)]
    url = "/records/batch?allow_misaligned=true&allow_duplicate=true"
    with TestClient(app) as c:
        r = c.post(url, json={"items": items}, headers=AUTH)
        assert c.get("/stats").json()["inbox"] == 1  # item 1 is in the inbox ...
        assert r.status_code == 207, (r.status_code, r.text)  # ... and the answer says so, item by item
        results = r.json()["results"]
        assert [x["status"] for x in results] == [201, 503, 503]
        assert "not attempted" in results[2]["detail"] and len(calls) == 2  # no second 30-s wait for item 3
        gate.acquire()  # every slot busy for the whole batch: nothing stored, the plain 503 with Retry-After
        try:
            r = c.post(url, json={"items": items[1:]}, headers=AUTH)
        finally:
            gate.release()
        assert r.status_code == 503 and r.headers["Retry-After"] and c.get("/stats").json()["inbox"] == 1


# ------------------------------------------------------------------------------------ 4. progressive JPEG scan bomb


def test_a_progressive_jpeg_with_thousands_of_scans_is_refused_before_decoding(small_art, monkeypatch):
    """16 Mpx (at CURATION_API_MAX_UPLOAD_PIXELS) and 6000 scans in 250 KB: each scan costs a pass over all 250k
    blocks (~1.2 ms), so the request burnt ~7 s of CPU holding a decode slot (10 MiB: minutes). Now 413 before the
    decoder runs; a normal progressive JPEG (10 scans) is still decoded."""
    from PIL import ImageFile

    data = many_scans_jpeg(4000, 6000)
    assert len(data) < 300_000  # 3 % of the default 10 MiB upload limit
    loads = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: loads.append(self.size) or real_load(self))
    normal = io.BytesIO()
    Image.fromarray((np.random.default_rng(0).random((300, 300, 3)) * 255).astype(np.uint8)).save(
        normal, "JPEG", progressive=True)
    with TestClient(_app(small_art, max_upload_bytes=300_000)) as c:
        r = c.post("/search/image", files={"file": ("q.jpg", data, "image/jpeg")})
        assert r.status_code == 413 and "over 100 scans" in r.json()["detail"], r.text
        assert loads == []  # refused on its markers, never handed to the decoder
        ok = c.post("/search/image", files={"file": ("q.jpg", normal.getvalue(), "image/jpeg")})
        assert ok.status_code == 200 and loads, ok.text


# ------------------------------------------------------------------------------------ 5. a non-ASCII write token


def test_a_write_token_outside_visible_ascii_is_refused_at_start(small_art):
    """HTTP carries the header as bytes each client encodes its own way: a non-ASCII token matched only when the
    client sent latin-1 (sent as UTF-8 it was always 401, with nothing said at start). It is now refused at start."""
    for token in ("clé-secrète", "two words", "tab\there"):
        with pytest.raises(ValueError, match="CURATION_API_WRITE_TOKEN must be visible ASCII"):
            make_settings(small_art, write_token=token)
    make_settings(small_art, write_token="Ab0-._~+/=")  # RFC 6750 token characters are fine


# ------------------------------------------------------------------------------------ 6. /records form overhead


def test_records_with_an_image_under_the_limit_and_a_valid_description_is_not_413(small_art):
    """The /records body limit is max_upload_bytes + 64 KiB of "multipart framing", but the form also carries
    designation (2000 chars) and description (20000 chars), i.e. up to 88 KB of UTF-8: a valid request whose
    image is under the limit is refused with 413 'image upload larger than the limit'."""
    limit = 200_000  # make_settings
    image = _noise_jpeg(200)
    image += b"\0" * (limit - 10_000 - len(image))  # trailing bytes after EOI: still a valid JPEG, 10 KB under
    assert len(image) < limit
    data = {"designation": "Tente de camping dome 4 places", "description": "\U0001F3D5" * 20000}  # 80 KB
    with TestClient(_app(small_art, write_token=TOKEN)) as c:
        ascii_ = c.post("/records?allow_misaligned=true&allow_duplicate=true", headers=AUTH,
                        files={"image": ("p.jpg", image, "image/jpeg")}, data={**data, "description": "x" * 20000})
        assert ascii_.status_code == 201, ascii_.text  # the same image with a 20 KB description is accepted
        r = c.post("/records?allow_misaligned=true&allow_duplicate=true", headers=AUTH,
                   files={"image": ("p.jpg", image, "image/jpeg")}, data=data)
    assert r.status_code != 413, r.text


def test_an_added_product_whose_picture_no_jpeg_can_hold_is_refused_with_the_reason(small_art):
    """70000x2 px is 140 kpx (under every pixel cap) but over JPEG's 65,500-px side, and the inbox stores products as
    the pipeline does (re-encoded as JPEG): before, that re-encode raised and the request failed."""
    buf = io.BytesIO()
    Image.new("RGB", (70_000, 2), (200, 10, 10)).save(buf, format="PNG")
    with TestClient(_app(small_art, write_token=TOKEN)) as c:
        r = c.post("/records?allow_misaligned=true&allow_duplicate=true", headers=AUTH,
                   files={"image": ("p.png", buf.getvalue(), "image/png")}, data={"designation": "Frise murale rouge"})
        assert r.status_code == 413 and "65500 pixels a side" in r.json()["detail"], r.text
        assert str(small_art) not in r.text and c.get("/stats").json()["inbox"] == 0
