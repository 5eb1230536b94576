"""Adding products through the API: authenticated, checked like the pipeline, searchable at once, never lost."""
from __future__ import annotations

import base64
import io
import json
import os
import shutil
import signal
import threading
import time

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from api.main import create_app
from api_helpers import make_settings, running_uvicorn
from curation_dagster.core.artifacts import (
    build_probe, load_version, publish_curated_version, read_current_version_name,
)
from curation_dagster.core.inbox import ALLOCATED_ID_BASE, Inbox

TOKEN = "s3cret-token-for-tests"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _jpeg(seed: int, size: int = 160) -> bytes:
    """A new product photo: smooth random colour field (distinct from every sample image)."""
    rng = np.random.default_rng(seed)
    small = (rng.random((4, 4, 3)) * 255).astype(np.uint8)
    img = Image.fromarray(small).resize((size, size), Image.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _form(title: str = "Tente de camping dôme 4 places imperméable", **extra) -> dict:
    return {"designation": title, **{k: str(v) for k, v in extra.items()}}


@pytest.fixture
def client(artifacts_copy, tiny_encoder):
    settings = make_settings(artifacts_copy, write_token=TOKEN)
    with TestClient(create_app(settings, encoder_loader=lambda m, d: tiny_encoder)) as c:
        yield c


def test_auth_none_wrong_right_and_disabled(artifacts_copy, tiny_encoder):
    files = {"image": ("p.jpg", _jpeg(1), "image/jpeg")}
    disabled = make_settings(artifacts_copy)
    with TestClient(create_app(disabled, encoder_loader=lambda m, d: tiny_encoder)) as c:
        r = c.post("/records", files=files, data=_form(), headers=AUTH)
        assert r.status_code == 403 and "CURATION_API_WRITE_TOKEN" in r.json()["detail"]
    enabled = make_settings(artifacts_copy, write_token=TOKEN)
    with TestClient(create_app(enabled, encoder_loader=lambda m, d: tiny_encoder)) as c:
        assert c.post("/records", files=files, data=_form()).status_code == 401
        assert c.post("/records", files=files, data=_form(), headers={"Authorization": "Bearer nope"}).status_code == 401
        assert c.post("/records", files=files, data=_form(), headers={"Authorization": TOKEN}).status_code == 401
        assert c.delete(f"/records/{ALLOCATED_ID_BASE + 1}").status_code == 401
        r = c.post("/records", files=files, data=_form(), headers=AUTH)
        assert r.status_code == 201, r.text
        assert c.get("/stats").status_code == 200  # read routes stay open


def test_added_product_is_searchable_at_once_and_durable(client, artifacts_copy):
    r = client.post("/records", files={"image": ("p.jpg", _jpeg(2), "image/jpeg")},
                    data=_form(prdtypecode=2583, description="<b>Avec</b> sac de transport"), headers=AUTH)
    assert r.status_code == 201, r.text
    body = r.json()
    rid = body["record_id"]
    assert rid > ALLOCATED_ID_BASE and body["source"] == "api" and body["prdtypecode"] == 2583
    assert body["description"] == "Avec sac de transport"  # cleaned like the pipeline cleans
    assert body["category"] == "Equipement pour piscine"
    assert body["decisions"]["duplicate"]["is_duplicate"] is False
    assert set(body["decisions"]["alignment"]) >= {"alignment_score", "threshold", "below_threshold"}
    # durable: one complete inbox entry, written before the 201
    entries = Inbox(artifacts_copy).entries()
    assert [e.record_id for e in entries] == [rid]
    # searchable at once: by record, by image (its own image finds it first), in its category, in /stats
    rec = client.get(f"/record/{rid}")
    assert rec.status_code == 200 and rec.json()["source"] == "api"
    assert client.get(rec.json()["image_url"]).status_code == 200
    hits = client.post("/search/image", files={"file": ("q.jpg", _jpeg(2), "image/jpeg")}, data={"top_k": "3"}).json()
    assert hits[0]["record_id"] == rid
    cat = client.post("/search", json={"query": "tente", "top_k": 100, "category": 2583}).json()
    assert rid in [h["record_id"] for h in cat]
    stats = client.get("/stats").json()
    assert stats["inbox"] == 1 and stats["label_distribution"]["2583"] >= 1
    # deleted: gone from search at once, tombstoned for the next run
    assert client.delete(f"/records/{rid}", headers=AUTH).json() == {"deleted": rid}
    assert client.get(f"/record/{rid}").status_code == 404
    assert client.delete(f"/records/{rid}", headers=AUTH).status_code == 404
    assert Inbox(artifacts_copy).entries() == [] and Inbox(artifacts_copy).tombstoned() == {rid}


@pytest.mark.parametrize("files, data, status, words", [
    ({"image": ("p.jpg", b"not an image", "image/jpeg")}, _form(), 415, "not"),
    ({"image": ("p.jpg", _jpeg(3)[:400], "image/jpeg")}, _form(), 415, ""),
    ({"image": ("p.jpg", _jpeg(3), "image/jpeg")}, _form(title="<p>&nbsp;</p>"), 422, "designation"),
    ({"image": ("p.jpg", _jpeg(3), "image/jpeg")}, _form(prdtypecode=99999), 422, "99999"),
])
def test_bad_input_is_refused_with_the_reason(client, artifacts_copy, files, data, status, words):
    r = client.post("/records", files=files, data=data, headers=AUTH)
    assert r.status_code == status, r.text
    assert words in json.dumps(r.json()["detail"])
    assert Inbox(artifacts_copy).entries() == []  # nothing half-stored


def test_near_duplicate_is_409_unless_forced(client, artifacts_copy):
    version = load_version(artifacts_copy)
    row = version.records.row(0, named=True)
    copy = (artifacts_copy / "images" / row["image_file"]).read_bytes()
    r = client.post("/records", files={"image": ("p.jpg", copy, "image/jpeg")}, data=_form(title="Autre titre"),
                    headers=AUTH)
    assert r.status_code == 409, r.text
    d = r.json()["detail"]
    assert d["duplicate_of"] == row["record_id"] and d["similarity"] >= 0.95 and d["evidence"] == "image"
    forced = client.post("/records?allow_duplicate=true", files={"image": ("p.jpg", copy, "image/jpeg")},
                         data=_form(title="Autre titre"), headers=AUTH)
    assert forced.status_code == 201 and forced.json()["decisions"]["duplicate"]["is_duplicate"] is True
    # an earlier addition counts too
    again = client.post("/records", files={"image": ("p.jpg", _jpeg(7), "image/jpeg")}, data=_form(), headers=AUTH)
    assert again.status_code == 201
    twice = client.post("/records", files={"image": ("p.jpg", _jpeg(7), "image/jpeg")}, data=_form(), headers=AUTH)
    assert twice.status_code == 409 and twice.json()["detail"]["duplicate_of"] == again.json()["record_id"]


def test_misaligned_is_422_with_score_and_threshold_unless_forced(tmp_path, tiny_encoder, sample_artifacts_dir):
    src = load_version(sample_artifacts_dir)
    keep = slice(0, 60)
    manifest = dict(src.manifest, thresholds={"alignment": {"used": {"global": 0.99}},
                                              "dedup": {"image_threshold": 0.95, "text_threshold": 0.99}})
    manifest["probe"] = build_probe(src.records[keep]["designation"].to_list())
    for k in ("version", "count", "dim", "created_at", "format_version"):
        manifest.pop(k, None)
    publish_curated_version(tmp_path, src.records[keep], src.image_emb[keep], src.text_emb[keep], manifest)
    shutil.copytree(sample_artifacts_dir / "images", tmp_path / "images")
    settings = make_settings(tmp_path, write_token=TOKEN)
    with TestClient(create_app(settings, encoder_loader=lambda m, d: tiny_encoder)) as c:
        r = c.post("/records", files={"image": ("p.jpg", _jpeg(4), "image/jpeg")}, data=_form(), headers=AUTH)
        assert r.status_code == 422, r.text
        d = r.json()["detail"]
        assert d["threshold"] == 0.99 and d["alignment_score"] < 0.99 and d["threshold_of"] == "global"
        ok = c.post("/records?allow_misaligned=true", files={"image": ("p.jpg", _jpeg(4), "image/jpeg")},
                    data=_form(), headers=AUTH)
        assert ok.status_code == 201 and ok.json()["decisions"]["alignment"]["below_threshold"] is True


def test_twenty_concurrent_adds_and_a_batch(client, artifacts_copy):
    results = []

    def add(i):
        results.append(client.post("/records", files={"image": ("p.jpg", _jpeg(100 + i), "image/jpeg")},
                                   data=_form(title=f"Produit numéro {i} en bois massif"), headers=AUTH))

    threads = [threading.Thread(target=add, args=(i,)) for i in range(20)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert sorted(r.status_code for r in results) == [201] * 20, [r.text for r in results if r.status_code != 201]
    ids = {r.json()["record_id"] for r in results}
    assert len(ids) == 20 and {e.record_id for e in Inbox(artifacts_copy).entries()} == ids
    assert client.get("/stats").json()["inbox"] == 20
    batch = {"items": [{"image_base64": base64.b64encode(_jpeg(300 + i)).decode(), "designation": f"Lot {i} crayons"}
                       for i in range(3)] + [{"image_base64": "%%%", "designation": "x"}]}
    r = client.post("/records/batch", json=batch, headers=AUTH)
    assert r.status_code == 207
    statuses = [x["status"] for x in r.json()["results"]]
    assert statuses == [201, 201, 201, 422]
    too_many = {"items": batch["items"][:1] * 21}
    assert client.post("/records/batch", json=too_many, headers=AUTH).status_code == 413


def publish_with_inbox(artifacts) -> str:
    """Publish the served version plus every live inbox product, as the next pipeline run would; its name."""
    import polars as pl

    v = load_version(artifacts)
    recs, imgs, txts = [v.records], [v.image_emb], [v.text_emb]
    for entry in Inbox(artifacts).entries():
        z = np.load(entry.path / "embeddings.npz")
        shutil.copyfile(entry.image_path, artifacts / "images" / entry.record["image_file"])  # as product_images does
        recs.append(pl.DataFrame([{k: entry.record[k] for k in v.records.columns}], schema=v.records.schema))
        imgs.append(z["image"][None])
        txts.append(z["text"][None])
    records = pl.concat(recs)
    manifest = {k: val for k, val in v.manifest.items() if k not in ("version", "count", "dim", "created_at")}
    manifest["probe"] = build_probe(records["designation"].to_list())
    return publish_curated_version(artifacts, records, np.vstack(imgs), np.vstack(txts), manifest,
                                   images_from=artifacts / "images").version


def test_a_published_version_containing_the_product_takes_it_out_of_the_delta(client, artifacts_copy):
    r = client.post("/records", files={"image": ("p.jpg", _jpeg(9), "image/jpeg")}, data=_form(), headers=AUTH)
    rid = r.json()["record_id"]
    publish_with_inbox(artifacts_copy)
    assert client.app.state.service.check_for_update()
    hits = client.post("/search/image", files={"file": ("q.jpg", _jpeg(9), "image/jpeg")}, data={"top_k": "5"}).json()
    assert [h["record_id"] for h in hits].count(rid) == 1  # no double hit
    assert client.get("/stats").json()["inbox"] == 0


def test_adds_during_hot_reloads_lose_nothing(artifacts_copy, tiny_encoder):
    settings = make_settings(artifacts_copy, write_token=TOKEN, reload_interval_s=0.2)
    v = load_version(artifacts_copy)
    with TestClient(create_app(settings, encoder_loader=lambda m, d: tiny_encoder)) as c:
        added = []

        def publisher():
            for i in range(3):
                keep = np.ones(v.count, bool)
                keep[i::7] = False
                m = {k: val for k, val in v.manifest.items() if k not in ("version", "count", "dim", "created_at")}
                m["probe"] = build_probe(v.records.filter(keep)["designation"].to_list())
                publish_curated_version(artifacts_copy, v.records.filter(keep), v.image_emb[keep], v.text_emb[keep], m)
                time.sleep(0.4)

        t = threading.Thread(target=publisher)
        t.start()
        for i in range(12):
            r = c.post("/records", files={"image": ("p.jpg", _jpeg(500 + i), "image/jpeg")},
                       data=_form(title=f"Article {i} neuf"), headers=AUTH)
            assert r.status_code == 201, r.text
            added.append(r.json()["record_id"])
        t.join()
        time.sleep(0.6)
        assert read_current_version_name(artifacts_copy) != v.version
        assert all(c.get(f"/record/{rid}").status_code == 200 for rid in added)


@pytest.mark.e2e
def test_sigkill_right_after_201_loses_nothing(sample_artifacts_dir, tmp_path):
    art = tmp_path / "artifacts"
    shutil.copytree(sample_artifacts_dir, art)
    env = {"CURATION_API_WRITE_TOKEN": TOKEN, "CURATION_API_RELOAD_INTERVAL_S": "0"}
    with running_uvicorn(art, env, tmp_path / "first.log", unset=("CURATION_CLIP_MODEL",)) as (proc, base):
        r = httpx.post(f"{base}/records", files={"image": ("p.jpg", _jpeg(11), "image/jpeg")},
                       data=_form(title="Hamac de jardin en coton"), headers=AUTH, timeout=60)
        os.kill(proc.pid, signal.SIGKILL)  # the instant the 201 is in hand: no shutdown, no flush
        proc.wait(timeout=30)
    assert r.status_code == 201, r.text
    rid = r.json()["record_id"]
    with running_uvicorn(art, env, tmp_path / "second.log", unset=("CURATION_CLIP_MODEL",)) as (_, base):
        rec = httpx.get(f"{base}/record/{rid}", timeout=30)  # a restart replays the inbox
        assert rec.status_code == 200 and rec.json()["designation"] == "Hamac de jardin en coton"
        hits = httpx.post(f"{base}/search/image", files={"file": ("q.jpg", _jpeg(11), "image/jpeg")},
                          data={"top_k": "1"}, timeout=30).json()
        assert hits[0]["record_id"] == rid


@pytest.mark.parametrize("root", ["", "/api"])  # "/api": served behind a proxy prefix (uvicorn --root-path /api)
@pytest.mark.parametrize("method,path,headers", [
    ("POST", "/records/batch", []),
    ("POST", "/records", [(b"authorization", b"Bearer nope")]),
    ("DELETE", f"/records/{ALLOCATED_ID_BASE + 1}", [(b"authorization", TOKEN.encode())]),  # no scheme
])
def test_unauthenticated_write_is_refused_before_its_body_is_received(artifacts_copy, tiny_encoder, method, path,
                                                                      headers, root):
    """FastAPI reads and parses a body before a route's dependencies run: without the middleware a client with no
    token could make the server buffer and JSON-decode a ~280 MB batch body just to be told 401."""
    import asyncio

    app = create_app(make_settings(artifacts_copy, write_token=TOKEN), encoder_loader=lambda m, d: tiny_encoder)
    received, sent = [], []

    async def receive():
        received.append(1)
        return {"type": "http.request", "body": b"not json at all", "more_body": False}

    async def send(message):
        sent.append(message)

    path = root + path
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "path": path,
             "raw_path": path.encode(), "query_string": b"", "root_path": root, "scheme": "http",
             "server": ("testserver", 80), "client": ("127.0.0.1", 1),
             "headers": [(b"host", b"testserver"), (b"content-type", b"application/json"),
                         (b"content-length", b"15"), *headers]}
    asyncio.run(app(scope, receive, send))
    assert sent[0]["status"] == 401 and received == []
    body = json.loads(b"".join(m.get("body", b"") for m in sent[1:]))
    assert body == {"detail": "missing or wrong bearer token"}
    assert (b"www-authenticate", b"Bearer") in sent[0]["headers"]


def test_a_png_or_webp_upload_is_stored_and_served_as_a_jpeg(client):
    """Before: the PNG's bytes were stored as <id>.jpg and served as image/jpeg."""
    for fmt in ("PNG", "WEBP"):
        buf = io.BytesIO()
        Image.open(io.BytesIO(_jpeg(120 + len(fmt)))).save(buf, format=fmt)
        r = client.post("/records", files={"image": (f"p.{fmt.lower()}", buf.getvalue(), f"image/{fmt.lower()}")},
                        data=_form(title=f"Vase en céramique {fmt}"), headers=AUTH)
        assert r.status_code == 201, r.text
        served = client.get(r.json()["image_url"])
        assert served.headers["content-type"] == "image/jpeg" and served.content[:3] == b"\xff\xd8\xff"


def test_an_uploaded_query_is_turned_upright_by_its_exif_orientation():
    from api.uploads import decode_upload

    buf = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 8
    Image.new("RGB", (400, 240), (200, 30, 30)).save(buf, format="JPEG", exif=exif)
    assert decode_upload(buf.getvalue(), max_pixels=10**7).size == (240, 400)


def test_an_added_product_never_overwrites_a_pipeline_image(client, artifacts_copy):
    """A productid the served version lacks (a row curation removed) is accepted; its image name is the removed
    row's. Before the fix the API copied its photo over images/<name>, the pipeline's file (and a failed copy made
    it answer 507 for a product it had stored). Now /images serves the inbox entry's own image."""
    images = artifacts_copy / "images"
    imageid, productid = 987654321, 123456789  # not served: the photo of a row the last run removed
    name = f"{imageid}_{productid}.jpg"
    assert name not in set(load_version(artifacts_copy).records["image_file"].to_list())
    (images / name).write_bytes(_jpeg(60))
    before = (images / name).read_bytes()
    r = client.post("/records?allow_duplicate=true&allow_misaligned=true",
                    files={"image": ("p.jpg", _jpeg(61), "image/jpeg")},
                    data=_form(productid=productid, imageid=imageid), headers=AUTH)
    assert r.status_code == 201, r.text
    assert r.json()["image_file"] == name
    assert (images / name).read_bytes() == before  # the pipeline's file is untouched
    shown = client.get(f"/images/{name}")
    assert shown.status_code == 200 and shown.content != before
    assert np.abs(np.asarray(Image.open(io.BytesIO(shown.content)), np.int16)
                  - np.asarray(Image.open(io.BytesIO(_jpeg(61))), np.int16)).mean() < 3  # the added photo
    assert shown.headers["content-type"] == "image/jpeg"
