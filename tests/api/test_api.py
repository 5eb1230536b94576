"""The HTTP API over a curated artifact built from the real sample with the tiny-random CLIP."""
from __future__ import annotations

import io
import json

import numpy as np
import polars as pl
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from api.main import create_app
from curation_dagster.core.artifacts import images_dir, load_version, read_current_version_name

from api_helpers import make_settings

SEED = {"query": "armoire chambre enfants", "top_k": 5}
HIT_KEYS = {"record_id", "score", "image_url", "designation", "prdtypecode", "category", "alignment_score"}


@pytest.fixture(scope="module")
def version(sample_artifacts_dir):
    return load_version(sample_artifacts_dir)


@pytest.fixture(scope="module")
def client(sample_artifacts_dir, tiny_encoder):
    app = create_app(make_settings(sample_artifacts_dir), encoder_loader=lambda model, device: tiny_encoder)
    with TestClient(app) as c:
        yield c


def cosine_ranking(version, q: np.ndarray, rows: np.ndarray | None = None) -> list[int]:
    rows = np.arange(version.count) if rows is None else rows
    scores = version.image_emb[rows] @ q
    return [int(version.records["record_id"][int(r)]) for r in rows[np.argsort(-scores, kind="stable")]]


# ---------------------------------------------------------------------------------------------- search


def test_seed_request(client, version, tiny_encoder, sample_artifacts_dir):
    r = client.post("/search", json=SEED)
    assert r.status_code == 200, r.text
    hits = r.json()
    assert isinstance(hits, list) and len(hits) == 5
    assert all(set(h) == HIT_KEYS for h in hits)
    assert r.headers["x-curated-version"] == version.version
    assert [part.split(";")[0] for part in r.headers["server-timing"].split(", ")] == ["encode", "search", "records"]
    scores = [h["score"] for h in hits]
    assert scores == sorted(scores, reverse=True)
    # score = cosine(query, image embedding), and the ranking is the exact one.
    q = tiny_encoder.encode_texts([SEED["query"]])[0]
    assert [h["record_id"] for h in hits] == cosine_ranking(version, q)[:5]
    recs = version.records
    for h in hits:
        row = recs.filter(pl.col("record_id") == h["record_id"]).row(0, named=True)
        i = int(np.flatnonzero(recs["record_id"].to_numpy() == h["record_id"])[0])
        assert h["score"] == pytest.approx(float(version.image_emb[i] @ q), abs=1e-4)
        assert h["designation"] == row["designation"] and h["prdtypecode"] == row["prdtypecode"]
        assert h["category"] == row["category"] and h["alignment_score"] == pytest.approx(row["alignment_score"])
        assert h["image_url"] == f"/images/{row['imageid']}_{row['productid']}.jpg"  # relative: never from Host
        img = client.get(h["image_url"])
        assert img.status_code == 200 and img.headers["content-type"] == "image/jpeg"
        assert img.content == (images_dir(sample_artifacts_dir) / row["image_file"]).read_bytes()


def test_default_top_k_and_second_seed_query(client):
    r = client.post("/search", json={"query": "lampe torche étanche camping"})
    assert r.status_code == 200 and len(r.json()) == 5


def test_category_filter_returns_exactly_k_from_category(client, version, tiny_encoder):
    codes = version.records["prdtypecode"].to_numpy()
    counts = {int(c): int((codes == c).sum()) for c in np.unique(codes)}
    cat = max(counts, key=counts.get)
    k = 15
    assert counts[cat] >= k
    r = client.post("/search", json={"query": "jeu de société enfants", "top_k": k, "category": cat})
    assert r.status_code == 200, r.text
    hits = r.json()
    assert len(hits) == k and all(h["prdtypecode"] == cat for h in hits)
    q = tiny_encoder.encode_texts(["jeu de société enfants"])[0]
    assert [h["record_id"] for h in hits] == cosine_ranking(version, q, np.flatnonzero(codes == cat))[:k]
    # Fewer than k in the category → all of them; unknown category → empty list.
    small = min(counts, key=counts.get)
    r = client.post("/search", json={"query": "x", "top_k": 100, "category": small})
    assert len(r.json()) == counts[small]
    unknown = client.post("/search", json={"query": "x", "category": 123456})
    assert unknown.status_code == 404 and "unknown category 123456" in unknown.json()["detail"]


def test_top_k_bounds_and_whole_corpus(client, version):
    assert len(client.post("/search", json={"query": "livre", "top_k": 1}).json()) == 1
    assert len(client.post("/search", json={"query": "livre", "top_k": 100}).json()) == 100


@pytest.mark.parametrize(
    "body, fragment",
    [
        ({"query": ""}, "query must not be empty or blank"),
        ({"query": "   \n\t "}, "query must not be empty or blank"),
        ({"query": "x" * 1001}, "at most 1000 characters"),
        ({"query": "é" * 1001}, "at most 1000 characters"),
        ({"query": "lampe", "top_k": 0}, "greater than or equal to 1"),
        ({"query": "lampe", "top_k": 101}, "less than or equal to 100"),
        ({"query": "lampe", "top_k": -5}, "greater than or equal to 1"),
        ({"query": "lampe", "top_k": "5"}, "valid integer"),
        ({"query": "lampe", "top_k": 5.5}, "valid integer"),
        ({"query": "lampe", "top_k": True}, "valid integer"),
        ({"query": "lampe", "category": "livres"}, "valid integer"),
        ({"top_k": 5}, "Field required"),
        ({"query": 42}, "valid string"),
        ({"query": None}, "valid string"),
    ],
)
def test_bad_search_bodies_422(client, body, fragment):
    r = client.post("/search", json=body)
    assert r.status_code == 422, r.text
    assert fragment in json.dumps(r.json()["detail"])


def test_malformed_json_422(client):
    r = client.post("/search", content=b'{"query": "lampe", ', headers={"content-type": "application/json"})
    assert r.status_code == 422 and "detail" in r.json()


@pytest.mark.parametrize(
    "query",
    [
        "x" * 1000,
        "é" * 1000,
        "🛋️ canapé d'angle 😀👍🏽",
        "儿童衣柜 子供のワードローブ",
        "خزانة أطفال",
        "e\u0301te\u0301 (combining accents)",
        "tab\tnew\nline \u200b zero-width \u00a0nbsp",
        "nul \u0000 char",
        "<script>alert(1)</script> ' OR 1=1 --",
    ],
)
def test_any_unicode_query_ok(client, query):
    r = client.post("/search", json={"query": query, "top_k": 3})
    assert r.status_code == 200, r.text
    assert len(r.json()) == 3


# ---------------------------------------------------------------------------------------------- record, stats


def test_record(client, version):
    row = version.records.row(10, named=True)
    r = client.get(f"/record/{row['record_id']}")
    assert r.status_code == 200
    body = r.json()
    for k, v in row.items():
        assert body[k] == pytest.approx(v) if isinstance(v, float) else body[k] == v
    assert body["image_url"] == f"/images/{row['image_file']}"
    assert body["version"] == version.version


@pytest.mark.parametrize("rid, status", [(1, 404), (-7, 404), (2**70, 404), ("abc", 422), ("1.5", 422)])
def test_unknown_record(client, rid, status):
    r = client.get(f"/record/{rid}")
    assert r.status_code == status
    assert "detail" in r.json()
    if status == 404:
        assert str(rid) in r.json()["detail"]


def test_stats(client, version, sample_artifacts_dir):
    r = client.get("/stats")
    assert r.status_code == 200
    s = r.json()
    assert s["num_records"] == version.count == 547
    assert sum(s["label_distribution"].values()) == 547 and len(s["label_distribution"]) == 27
    codes = version.records["prdtypecode"].to_list()
    assert all(s["label_distribution"][str(c)] == codes.count(c) for c in set(codes))
    a = version.records["alignment_score"].to_numpy().astype(np.float64)
    st = s["alignment_score_stats"]
    assert st["min"] <= st["p10"] <= st["p50"] <= st["p90"] <= st["max"]
    assert st["mean"] == pytest.approx(a.mean(), abs=1e-6) and st["p50"] == pytest.approx(np.median(a), abs=1e-6)
    assert s["version"] == read_current_version_name(sample_artifacts_dir)
    assert s["model"] == "tiny-random" and s["meaningless"] is True and "meaningless" in s["note"]
    assert s["counts"]["curated"] == 547 and set(s["counts"]) >= {"raw", "clean", "removed_duplicate"}
    assert s["index"]["kind"] == "flat" and s["reload_error"] is None
    assert s["categories"][str(codes[0])] == version.records["category"][0]


def test_health_ready_docs(client, version):
    assert client.get("/healthz").json() == {"status": "ok"}
    r = client.get("/readyz")
    assert r.status_code == 200
    assert r.json()["status"] == "ready" and r.json()["version"] == version.version and r.json()["model"] == "tiny-random"
    assert client.get("/docs").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/search", "/search/image", "/record/{record_id}", "/stats", "/images/{file_name}", "/healthz", "/readyz"} <= set(paths)


def test_unknown_route_and_method_are_json(client):
    r = client.get("/nope")
    assert r.status_code == 404 and r.json() == {"detail": "Not Found"}
    assert client.get("/search").status_code == 405


# ---------------------------------------------------------------------------------------------- images


TRAVERSALS = [
    "/images/../secret.jpg",
    "/images/..%2fsecret.jpg",
    "/images/%2e%2e%2fsecret.jpg",
    "/images/%2E%2E%2Fsecret.jpg",
    "/images/%2e%2e/secret.jpg",
    "/images/..%5csecret.jpg",
    "/images/..\\secret.jpg",
    "/images/%252e%252e%252fsecret.jpg",
    "/images/....//secret.jpg",
    "/images/..",
    "/images/.",
    "/images/",
    "/images/%2fetc%2fpasswd",
    "/images//etc/passwd",
    "/images/%2Fetc%2Fhostname",
    "/images/..%2f..%2f..%2f..%2f..%2fetc%2fpasswd",
    "/images/link.jpg",  # symlink inside images/ pointing outside
    "/images/.hidden.jpg",
    "/images/nul%00.jpg",
    "/images/missing_1.jpg",
    "/images/records.parquet",
]


@pytest.fixture(scope="module")
def planted_outside(sample_artifacts_dir):
    """A JPEG just outside images/ and a symlink to it inside: neither may be served."""
    secret = sample_artifacts_dir / "secret.jpg"
    secret.write_bytes(b"\xff\xd8SECRET")
    link = images_dir(sample_artifacts_dir) / "link.jpg"
    if not link.exists():
        link.symlink_to(secret)
    (images_dir(sample_artifacts_dir) / ".hidden.jpg").write_bytes(b"\xff\xd8HIDDEN")
    yield
    link.unlink()
    (images_dir(sample_artifacts_dir) / ".hidden.jpg").unlink()
    secret.unlink()


@pytest.mark.parametrize("path", TRAVERSALS)
def test_image_traversal_404(client, planted_outside, path):
    r = client.get(path)
    assert b"SECRET" not in r.content and b"root:" not in r.content and b"HIDDEN" not in r.content
    if path == "/images/..":  # the HTTP client normalises it to "/" before sending: the search page answers
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        return
    assert r.status_code == 404, (path, r.status_code)
    assert "detail" in r.json()


def test_image_absolute_path_as_name_404(client, planted_outside, sample_artifacts_dir):
    r = client.get("/images/" + str(sample_artifacts_dir / "secret.jpg"))
    assert r.status_code == 404


# ---------------------------------------------------------------------------------------------- image search


def test_image_search_finds_the_same_image(client, version, sample_artifacts_dir):
    row = version.records.row(42, named=True)
    data = (images_dir(sample_artifacts_dir) / row["image_file"]).read_bytes()
    r = client.post("/search/image", files={"file": ("q.jpg", data, "image/jpeg")}, data={"top_k": "3"})
    assert r.status_code == 200, r.text
    hits = r.json()
    assert len(hits) == 3 and hits[0]["record_id"] == row["record_id"] and hits[0]["score"] > 0.99
    # Same image as PNG (different bytes, same pixels) → same top hit; category filter honoured.
    png = io.BytesIO()
    Image.open(io.BytesIO(data)).save(png, format="PNG")
    r = client.post("/search/image", files={"file": ("q.png", png.getvalue(), "image/png")},
                    data={"top_k": "4", "category": str(row["prdtypecode"])})
    hits = r.json()
    assert r.status_code == 200 and hits[0]["record_id"] == row["record_id"]
    assert len(hits) == 4 and all(h["prdtypecode"] == row["prdtypecode"] for h in hits)


def test_image_upload_too_big_413(client):
    limit = 200_000  # make_settings
    just_over = b"\xff\xd8\xff" + b"0" * (limit - 2)
    r = client.post("/search/image", files={"file": ("big.jpg", just_over, "image/jpeg")})
    assert r.status_code == 413 and "200000" in r.json()["detail"]
    way_over = b"0" * (limit * 5)
    r = client.post("/search/image", files={"file": ("big.jpg", way_over, "image/jpeg")})
    assert r.status_code == 413 and "detail" in r.json()


def test_image_upload_chunked_too_big_413(client):
    """No Content-Length (chunked): the bytes are counted as they arrive."""
    boundary = "XyZ"
    head = f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.jpg"\r\n\r\n'.encode()

    def body():
        yield head
        for _ in range(40):
            yield b"0" * 10_000
        yield f"\r\n--{boundary}--\r\n".encode()

    r = client.post("/search/image", content=body(), headers={"content-type": f"multipart/form-data; boundary={boundary}"})
    assert r.status_code == 413


def test_image_pixel_bomb_413(client, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    png = io.BytesIO()
    Image.new("RGB", (64, 64)).save(png, format="PNG")
    r = client.post("/search/image", files={"file": ("bomb.png", png.getvalue(), "image/png")})
    assert r.status_code == 413 and "pixels" in r.json()["detail"]


@pytest.mark.parametrize(
    "content",
    [b"", b"hello, not an image", b"%PDF-1.4 fake", b"\xff\xd8\xff\xe0" + b"\x00" * 50, b"\x89PNG\r\n\x1a\n" + b"\x00" * 20],
)
def test_not_an_image_415(client, content):
    r = client.post("/search/image", files={"file": ("x.jpg", content, "image/jpeg")})
    assert r.status_code == 415, r.text
    assert "not" in r.json()["detail"]


def test_truncated_jpeg_415(client, version, sample_artifacts_dir):
    data = (images_dir(sample_artifacts_dir) / version.records["image_file"][0]).read_bytes()
    r = client.post("/search/image", files={"file": ("t.jpg", data[: len(data) // 2], "image/jpeg")})
    assert r.status_code == 415


def test_image_search_validation(client):
    assert client.post("/search/image").status_code == 422  # no file
    png = io.BytesIO()
    Image.new("RGB", (8, 8)).save(png, format="PNG")
    r = client.post("/search/image", files={"file": ("a.png", png.getvalue())}, data={"top_k": "0"})
    assert r.status_code == 422
