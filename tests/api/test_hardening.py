"""Hostile input (issue 9): NaN/surrogates/huge bodies, Host header, what /images serves, upload formats and pixels."""
from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest
from api_helpers import HashEncoder, build_sample_artifact, make_settings
from fastapi.testclient import TestClient
from PIL import Image

from api.main import create_app
from curation_dagster.core.artifacts import images_dir, load_version


@pytest.fixture(scope="module")
def small_artifacts(tmp_path_factory):
    d = tmp_path_factory.mktemp("hardening")
    build_sample_artifact(d, HashEncoder(), rows=60)
    return d


@pytest.fixture(scope="module")
def client(small_artifacts):
    app = create_app(make_settings(small_artifacts, max_upload_pixels=1_000_000, max_upload_bytes=3_000_000),
                     encoder_loader=lambda m, d: HashEncoder())
    with TestClient(app) as c:
        yield c


def _png(size, mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size).save(buf, format="PNG")
    return buf.getvalue()


# ------------------------------------------------------------------------------------------- item 3: 422, not 500


@pytest.mark.parametrize(
    "raw",
    [
        b'{"query": "\\udc00"}',
        b'{"query": "lampe \\ud83d torche"}',
        b'{"query": "x", "top_k": NaN}',
        b'{"query": "x", "top_k": Infinity}',
        b'{"query": "x", "top_k": -Infinity}',
        b'{"query": "x", "category": NaN}',
        b'{"query": "x", "top_k": 1e400}',
        b'{"query": NaN}',
        b'{"\\udc00": 1, "query": 5}',
    ],
)
def test_surrogates_and_nan_are_422_not_500(client, raw):
    r = client.post("/search", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    text = r.content.decode("utf-8")  # valid UTF-8
    body = json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in response"))  # strict JSON: no NaN
    assert isinstance(body["detail"], list) and body["detail"]
    assert all({"loc", "msg", "type"} <= set(e) for e in body["detail"])


def test_422_echo_is_bounded(client):
    big = "A" * 60_000  # under the 64 KiB body limit
    r = client.post("/search", json={"query": big})
    assert r.status_code == 422
    assert len(r.content) < 2_000 and big not in r.text
    r = client.post("/search", json=list(range(5000)))
    assert r.status_code == 422 and len(r.content) < 2_000


def test_body_limit_on_json_routes(client):
    r = client.post("/search", content=b'{"query": "' + b"a" * 200_000 + b'"}', headers={"content-type": "application/json"})
    assert r.status_code == 413 and "CURATION_API_MAX_BODY_BYTES" in r.json()["detail"]

    def chunks():  # no Content-Length: counted as it streams
        yield b'{"query": "'
        for _ in range(50):
            yield b"a" * 10_000
        yield b'"}'

    r = client.post("/search", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413
    r = client.request("GET", "/stats", content=b"x" * 100_000)  # every route, not just /search
    assert r.status_code == 413
    ok = client.post("/search", json={"query": "lampe " * 100})
    assert ok.status_code == 200


# ------------------------------------------------------------------------------------------- item 4: Host header


def test_image_url_never_from_host_header(client):
    r = client.post("/search", json={"query": "lampe", "top_k": 3}, headers={"host": "evil.example"})
    assert r.status_code == 200
    for h in r.json():
        assert h["image_url"].startswith("/images/") and "evil" not in h["image_url"]
    rid = r.json()[0]["record_id"]
    rec = client.get(f"/record/{rid}", headers={"host": "evil.example", "x-forwarded-host": "evil.example"}).json()
    assert rec["image_url"] == f"/images/{rec['image_file']}"


def test_public_url_makes_absolute_urls(small_artifacts):
    app = create_app(make_settings(small_artifacts, public_url="https://search.example.org"),
                     encoder_loader=lambda m, d: HashEncoder())
    with TestClient(app) as c:
        hit = c.post("/search", json={"query": "lampe", "top_k": 1}, headers={"host": "evil.example"}).json()[0]
    assert hit["image_url"].startswith("https://search.example.org/images/")


# ------------------------------------------------------------------------------------------- item 5: /images


def test_images_serves_only_served_versions_images(small_artifacts, tmp_path):
    art = tmp_path / "art"
    shutil.copytree(small_artifacts, art)
    v = load_version(art)
    served = v.records["image_file"][0]
    stray = images_dir(art) / "999_999.jpg"  # e.g. a rejected decompression bomb left in images/
    stray.write_bytes(b"\xff\xd8 not served")
    app = create_app(make_settings(art), encoder_loader=lambda m, d: HashEncoder())
    with TestClient(app) as c:
        assert c.get(f"/images/{served}").status_code == 200
        assert c.get("/images/999_999.jpg").status_code == 404
        # A new version without row 0: the previous version's images stay reachable (a client mid-swap)...
        from api_helpers import subset_manifest
        from curation_dagster.core.artifacts import publish_curated_version

        keep = np.arange(1, v.count)
        publish_curated_version(art, v.records[keep], v.image_emb[keep], v.text_emb[keep], subset_manifest(v, v.records[keep]))
        assert app.state.service.check_for_update() is True
        assert c.get(f"/images/{served}").status_code == 200
        # ...but not two versions back.
        keep2 = np.arange(2, v.count)
        publish_curated_version(art, v.records[keep2], v.image_emb[keep2], v.text_emb[keep2],
                                subset_manifest(v, v.records[keep2]))
        assert app.state.service.check_for_update() is True
        assert c.get(f"/images/{served}").status_code == 404
        assert c.get(f"/images/{v.records['image_file'][1]}").status_code == 200  # previous version's
        assert c.get("/images/..%2f999_999.jpg").status_code == 404


# ------------------------------------------------------------------------------------------- item 6: formats, messages


EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nnewpath 0 0 moveto 10 10 lineto stroke showpage\n%%EOF\n"


def test_eps_upload_is_415_and_never_reaches_ghostscript(client, monkeypatch):
    from PIL import EpsImagePlugin

    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *a, **k: pytest.fail("Ghostscript called"))
    for name in ("a.eps", "a.jpg"):
        r = client.post("/search/image", files={"file": (name, EPS, "application/postscript")})
        assert r.status_code == 415, r.text
        assert r.json()["detail"] == "the upload is not a readable image: accepted formats are JPEG, PNG and WebP"


@pytest.mark.parametrize("fmt", ["GIF", "BMP", "TIFF", "ICO"])
def test_other_formats_415(client, fmt):
    buf = io.BytesIO()
    Image.new("RGB", (16, 16)).save(buf, format=fmt)
    r = client.post("/search/image", files={"file": ("a.img", buf.getvalue())})
    assert r.status_code == 415


@pytest.mark.parametrize("content", [b"garbage \x00\x01 bytes", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40,
                                     b"\xff\xd8\xff\xe0" + b"\x00" * 50, _png((32, 32))[:60]])
def test_error_details_leak_no_addresses_or_paths(client, content):
    r = client.post("/search/image", files={"file": ("x.png", content, "image/png")})
    assert r.status_code == 415
    detail = r.json()["detail"]
    assert "0x" not in detail and "/" not in detail and "BytesIO" not in detail


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_allowed_formats_ok(client, fmt):
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(buf, format=fmt)
    r = client.post("/search/image", files={"file": ("a", buf.getvalue())})
    assert r.status_code == 200, r.text


# ------------------------------------------------------------------------------------------- item 2: pixel cap


def test_pixel_cap_413_from_header(client, monkeypatch):
    loads = []
    data = _png((1100, 1000), "1")  # 1.1 Mpx > the 1 Mpx cap
    monkeypatch.setattr(Image.Image, "load", lambda self: loads.append(1) or pytest.fail("decoded"))
    r = client.post("/search/image", files={"file": ("big.png", data)})
    assert r.status_code == 413 and "CURATION_API_MAX_UPLOAD_PIXELS" in r.json()["detail"]
    assert not loads


def test_large_jpeg_decoded_reduced_and_shrunk(client, monkeypatch):
    """A 2000x1600 JPEG (3.2 Mpx > the 1 Mpx cap) decodes at reduced DCT scale: accepted, and small."""
    from api import main

    buf = io.BytesIO()
    Image.effect_noise((2000, 1600), 40).convert("RGB").save(buf, format="JPEG")
    seen = []
    real = main._shrink
    monkeypatch.setattr(main, "_shrink", lambda img, side: seen.append(img.size) or real(img, side))
    r = client.post("/search/image", files={"file": ("big.jpg", buf.getvalue())})
    assert r.status_code == 200, r.text
    assert seen and seen[0][0] * seen[0][1] <= 1_000_000  # draft: decoded at 1/2 or 1/4 scale, not 3.2 Mpx
    img = main.decode_upload(buf.getvalue(), max_pixels=1_000_000, target=224)
    assert min(img.size) == 448 and img.mode == "RGB"


# ----------------------------------------------------------------------------------- unlabelled products, categories

def _unlabelled_artifact(tmp_path):
    """A published version in which a third of the products have no class (as Kaggle's test part)."""
    import polars as pl

    from api_helpers import HashEncoder, make_settings
    from curation_dagster.core.artifacts import build_probe, publish_curated_version
    from test_artifacts import make_inputs

    enc = HashEncoder(dim=8)
    records, img, _, manifest = make_inputs(n=9, d=8)
    records = records.with_columns(
        pl.when(pl.int_range(pl.len()) % 3 == 0).then(None).otherwise(pl.col("prdtypecode")).alias("prdtypecode"),
        pl.when(pl.int_range(pl.len()) % 3 == 0).then(None).otherwise(pl.col("category")).alias("category"))
    texts = records["designation"].to_list()
    txt = enc.encode_texts(texts)
    publish_curated_version(tmp_path, records, img, txt, dict(manifest, model=enc.model_name,
                                                              probe=build_probe(texts)))
    return records, make_settings(tmp_path), enc


def test_unlabelled_products_are_searchable_filterable_and_counted(tmp_path):
    from fastapi.testclient import TestClient

    from api.main import create_app

    records, settings, enc = _unlabelled_artifact(tmp_path)
    unlabelled_ids = set(records.filter(records["prdtypecode"].is_null())["record_id"].to_list())
    with TestClient(create_app(settings, encoder_loader=lambda m, d: enc)) as client:
        stats = client.get("/stats").json()
        assert (stats["labelled"], stats["unlabelled"]) == (6, 3)
        assert stats["label_distribution"]["unlabelled"] == 3
        hits = client.post("/search", json={"query": "produit", "top_k": 9}).json()
        assert {h["record_id"] for h in hits} >= unlabelled_ids  # unlabelled products are in plain search
        only = client.post("/search", json={"query": "produit", "top_k": 9, "category": "unlabelled"}).json()
        assert {h["record_id"] for h in only} == unlabelled_ids and all(h["prdtypecode"] is None for h in only)
        rid = next(iter(unlabelled_ids))
        assert client.get(f"/record/{rid}").json()["prdtypecode"] is None
        from PIL import Image
        import io
        buf = io.BytesIO()
        Image.new("RGB", (64, 64), (200, 30, 30)).save(buf, "PNG")
        r = client.post("/search/image", files={"file": ("q.png", buf.getvalue(), "image/png")},
                        data={"top_k": "9", "category": "unlabelled"})
        assert r.status_code == 200 and {h["record_id"] for h in r.json()} == unlabelled_ids


def test_unknown_category_is_404_naming_the_known_ones(tmp_path):
    from fastapi.testclient import TestClient

    from api.main import create_app

    _, settings, enc = _unlabelled_artifact(tmp_path)
    with TestClient(create_app(settings, encoder_loader=lambda m, d: enc)) as client:
        r = client.post("/search", json={"query": "produit", "category": 99999})
        assert r.status_code == 404
        msg = r.json()["detail"]
        assert "unknown category 99999" in msg and "40 (Jeux)" in msg and "unlabelled" in msg
        # an official code with no record in this version: a valid filter with no result
        assert client.post("/search", json={"query": "produit", "category": 2905}).json() == []
        r = client.post("/search/image", files={"file": ("q.png", b"x", "image/png")}, data={"category": "99999"})
        assert r.status_code == 404 and "unknown category 99999" in r.json()["detail"]
