"""The pages (`/` search, `/curation` browser) and the JSON routes they call: /similar, /curation/removals, and
/images serving removed rows' images. TestClient only; tests/e2e/test_search_page.py drives them in Chromium."""
from __future__ import annotations

import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from api_helpers import HashEncoder, SAMPLE_DIR, build_sample_artifact, make_settings
from fastapi.testclient import TestClient

from api.main import create_app
from curation_dagster.core.artifacts import REMOVALS_FILE, curated_dir, image_file_name, images_dir, load_version

STRAY = "999_999.jpg"  # an image file under images/ that no record and no removal names


def add_removals(artifacts_dir: Path, *, duplicates: int = 3, misaligned: int = 2) -> pl.DataFrame:
    """Give the CURRENT version a removals.parquet (the columns the pipeline writes, see
    curation_dagster.assets.curate.removals_for_review) for sample rows that are not in it: ``duplicates`` rows
    duplicating served records, then ``misaligned`` rows; their images are copied to images/ (and a stray one)."""
    from curation_dagster.core.rakuten import read_source
    from curation_dagster.core.text import clean_text

    version = load_version(artifacts_dir)
    served = set(version.records["record_id"].to_list())
    products = read_source(SAMPLE_DIR).products.filter(~pl.col("record_id").is_in(list(served)))
    products = products.head(duplicates + misaligned)
    assert products.height == duplicates + misaligned, "the sample has too few rows left out of the version"
    img_dir = images_dir(artifacts_dir)
    rows = []
    for i, p in enumerate(products.iter_rows(named=True)):
        name = image_file_name(p["imageid"], p["productid"])
        shutil.copyfile(p["source_image_path"], img_dir / name)
        base = {"record_id": p["record_id"], "stage": "curate", "designation": clean_text(p["designation"]),
                "description": clean_text(p["description"]) or None, "prdtypecode": p["prdtypecode"],
                "category": p["category"], "image_file": name}
        if i < duplicates:
            kept = version.records.row(i, named=True)
            sim = 0.99 - 0.01 * i
            rows.append(base | {"reason": "duplicate", "detail": f"duplicate of {kept['record_id']} (image similarity "
                                f"{sim:.4f})", "alignment_score": 0.2, "threshold": None,
                                "duplicate_of": kept["record_id"], "similarity": sim, "evidence": "image",
                                "kept_designation": kept["designation"], "kept_image_file": kept["image_file"]})
        else:
            score, threshold = 0.01 * i, 0.15
            rows.append(base | {"reason": "misaligned", "detail": f"alignment score {score:.4f} < threshold "
                                f"{threshold:.4f}", "alignment_score": score, "threshold": threshold,
                                "duplicate_of": None, "similarity": None, "evidence": None,
                                "kept_designation": None, "kept_image_file": None})
    schema = {"record_id": pl.Int64, "stage": pl.Utf8, "reason": pl.Utf8, "detail": pl.Utf8,
              "alignment_score": pl.Float32, "threshold": pl.Float32, "duplicate_of": pl.Int64,
              "similarity": pl.Float32, "evidence": pl.Utf8, "designation": pl.Utf8, "description": pl.Utf8,
              "prdtypecode": pl.Int64, "category": pl.Utf8, "image_file": pl.Utf8, "kept_designation": pl.Utf8,
              "kept_image_file": pl.Utf8}
    removals = pl.DataFrame(rows, schema=schema)
    removals.write_parquet(curated_dir(artifacts_dir) / version.version / REMOVALS_FILE)
    shutil.copyfile(img_dir / removals["image_file"][0], img_dir / STRAY)
    return removals


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    d = tmp_path_factory.mktemp("pages")
    build_sample_artifact(d, HashEncoder(), rows=60)
    return d


@pytest.fixture(scope="module")
def removals(artifacts):
    return add_removals(artifacts)


@pytest.fixture(scope="module")
def client(artifacts, removals):
    app = create_app(make_settings(artifacts), encoder_loader=lambda m, d: HashEncoder())
    with TestClient(app) as c:
        yield c


@pytest.fixture(scope="module")
def version(artifacts, removals):
    return load_version(artifacts)


class _Scripts(HTMLParser):
    def __init__(self):
        super().__init__()
        self.scripts: list[dict] = []
        self.inline: list[str] = []
        self.handlers: list[str] = []
        self.styles: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.handlers += [f"{tag}[{k}]" for k in a if k.lower().startswith("on")]
        if "style" in a:
            self.styles.append(tag)
        if tag == "script":
            self.scripts.append(a)
            self._in_script = True

    def handle_endtag(self, tag):
        if tag == "script":
            self._in_script = False

    def handle_data(self, data):
        if self._in_script and data.strip():
            self.inline.append(data)


# ------------------------------------------------------------------------------------------------------- pages


@pytest.mark.parametrize("path, module", [("/", "static/search.js"), ("/curation", "static/curation.js")])  # relative
def test_pages_are_html_with_a_csp_and_no_inline_script(client, path, module):
    r = client.get(path)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    csp = r.headers["content-security-policy"]
    directives = {d.split()[0]: d.split()[1:] for d in csp.split("; ")}
    assert directives["script-src"] == ["'self'"] and directives["default-src"] == ["'none'"]
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
    assert r.headers["x-content-type-options"] == "nosniff"
    page = _Scripts()
    page.feed(r.text)
    assert page.scripts == [{"type": "module", "src": module}]
    assert not page.inline and not page.handlers and not page.styles
    assert not re.search(r"https?://", r.text)  # no CDN: everything from this origin


def test_static_files_with_their_types(client):
    for name, ctype in [("search.js", "text/javascript"), ("curation.js", "text/javascript"),
                        ("common.js", "text/javascript"), ("style.css", "text/css"), ("favicon.svg", "image/svg+xml")]:
        r = client.get(f"/static/{name}")
        assert r.status_code == 200 and r.headers["content-type"].split(";")[0] == ctype, name
        assert r.headers["x-content-type-options"] == "nosniff"
        if name.endswith((".js", ".css")):
            assert "http://" not in r.text and "https://" not in r.text  # nothing fetched from elsewhere
    for name in ("index.html", "nope.js", "..%2Fmain.py", "../main.py", "__init__.py"):
        assert client.get(f"/static/{name}").status_code == 404, name
    js = client.get("/static/search.js").text
    assert "innerHTML" not in js and "eval(" not in js


def test_csp_allows_the_public_image_origin(artifacts, removals):
    app = create_app(make_settings(artifacts, public_url="https://img.example.org/base"),
                     encoder_loader=lambda m, d: HashEncoder())
    with TestClient(app) as c:
        csp = c.get("/").headers["content-security-policy"]
    assert "img-src 'self' blob: https://img.example.org;" in csp


def test_pages_are_not_in_the_openapi_document(client):
    paths = client.get("/openapi.json").json()["paths"]
    assert "/" not in paths and "/curation" not in paths and "/static/{name}" not in paths
    assert {"/similar/{record_id}", "/curation/removals"} <= set(paths)
    assert set(paths["/similar/{record_id}"]["get"]["responses"]) >= {"200", "404", "422", "503"}


# ---------------------------------------------------------------------------------------------------- /similar


def test_similar_uses_the_stored_image_embedding_and_excludes_the_record(client, version):
    row = 7
    rid = int(version.records["record_id"][row])
    r = client.get(f"/similar/{rid}", params={"top_k": 5})
    assert r.status_code == 200, r.text
    hits = r.json()
    assert len(hits) == 5 and rid not in [h["record_id"] for h in hits]
    assert r.headers["x-curated-version"] == version.version
    scores = version.image_emb @ version.image_emb[row]
    ids = version.records["record_id"].to_list()
    order = [ids[i] for i in np.argsort(-scores, kind="stable").tolist() if i != row]
    assert [h["record_id"] for h in hits] == order[:5]
    assert hits[0]["score"] == pytest.approx(float(np.sort(scores)[-2]), abs=1e-4)
    assert set(hits[0]) == {"record_id", "score", "image_url", "designation", "prdtypecode", "category",
                            "alignment_score"}


def test_similar_category_and_errors(client, version):
    recs = version.records
    code = int(recs["prdtypecode"].mode()[0])
    rid = int(recs.filter(pl.col("prdtypecode") == code)["record_id"][0])
    n_cat = recs.filter(pl.col("prdtypecode") == code).height
    hits = client.get(f"/similar/{rid}", params={"top_k": 100, "category": str(code)}).json()
    assert len(hits) == n_cat - 1 and all(h["prdtypecode"] == code for h in hits)
    assert rid not in [h["record_id"] for h in hits]
    assert client.get(f"/similar/{rid}").status_code == 200 and len(client.get(f"/similar/{rid}").json()) == 5
    r = client.get("/similar/123")
    assert r.status_code == 404 and "record 123 is not in curated version" in r.json()["detail"]
    assert client.get(f"/similar/{rid}", params={"category": "99999"}).status_code == 404
    assert client.get(f"/similar/{rid}", params={"top_k": 0}).status_code == 422
    assert client.get(f"/similar/{rid}", params={"category": "shoes"}).status_code == 422
    assert client.get("/similar/99999999999999999999999").status_code == 404  # as /record: out of int64, unknown


# --------------------------------------------------------------------------------------------- /curation/removals


def test_removals_by_reason_with_kept_record_and_threshold(client, removals, version):
    r = client.get("/curation/removals")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["version"] == version.version and body["note"] is None
    assert body["counts"] == {"duplicate": 3, "misaligned": 2} and body["total"] == 5 and body["pages"] == 1
    assert [i["reason"] for i in body["items"]] == ["duplicate"] * 3 + ["misaligned"] * 2
    dup, mis = body["items"][0], body["items"][3]
    src = removals.filter(pl.col("record_id") == dup["record_id"]).row(0, named=True)
    assert dup["duplicate_of"] == src["duplicate_of"] and dup["kept_served"] is True
    assert dup["kept_designation"] == src["kept_designation"]
    assert dup["image_url"] == f"/images/{src['image_file']}" and dup["kept_image_url"] == f"/images/{src['kept_image_file']}"
    assert dup["similarity"] == pytest.approx(src["similarity"]) and dup["evidence"] == "image"
    assert mis["threshold"] == pytest.approx(0.15) and mis["alignment_score"] < mis["threshold"]
    assert mis["duplicate_of"] is None and mis["kept_image_url"] is None and mis["designation"]
    assert all(v for v in body["categories"].values())


def test_removals_paging_and_filters(client, removals):
    first = client.get("/curation/removals", params={"page_size": 2}).json()
    second = client.get("/curation/removals", params={"page_size": 2, "page": 2}).json()
    third = client.get("/curation/removals", params={"page_size": 2, "page": 3}).json()
    assert (first["total"], first["pages"]) == (5, 3)
    ids = [i["record_id"] for p in (first, second, third) for i in p["items"]]
    assert len(ids) == 5 == len(set(ids)) and [len(p["items"]) for p in (first, second, third)] == [2, 2, 1]
    past = client.get("/curation/removals", params={"page_size": 2, "page": 9}).json()
    assert past["items"] == [] and past["total"] == 5
    only = client.get("/curation/removals", params={"reason": "misaligned"}).json()
    assert only["total"] == 2 and {i["reason"] for i in only["items"]} == {"misaligned"}
    assert only["counts"] == {"duplicate": 3, "misaligned": 2}  # the whole version, for the filter labels
    code = int(removals["prdtypecode"][0])
    in_cat = client.get("/curation/removals", params={"category": str(code)}).json()
    assert in_cat["total"] == (removals["prdtypecode"] == code).sum() > 0
    assert all(i["prdtypecode"] == code for i in in_cat["items"])
    both = client.get("/curation/removals", params={"category": str(code), "reason": "duplicate"}).json()
    assert both["total"] == removals.filter((pl.col("prdtypecode") == code) & (pl.col("reason") == "duplicate")).height
    assert client.get("/curation/removals", params={"category": "unlabelled"}).json()["total"] == 0
    assert client.get("/curation/removals", params={"reason": "blurry"}).status_code == 422
    assert client.get("/curation/removals", params={"page_size": 101}).status_code == 422
    assert client.get("/curation/removals", params={"category": "99999"}).status_code == 404


def test_a_version_without_removals_answers_an_empty_list_with_a_note(tmp_path):
    build_sample_artifact(tmp_path, HashEncoder(), rows=30)
    with TestClient(create_app(make_settings(tmp_path), encoder_loader=lambda m, d: HashEncoder())) as c:
        r = c.get("/curation/removals")
        assert r.status_code == 200
        body = r.json()
        assert body["items"] == [] and body["total"] == 0 and "has no removals.parquet" in body["note"]
        assert c.get("/curation").status_code == 200


@pytest.mark.parametrize("table, served_items", [
    (pl.DataFrame({"productid": [1, 2], "reason": ["duplicate", "misaligned"]}), 0),  # no record_id column
    (pl.DataFrame({"record_id": ["7", None, "abc"], "reason": ["duplicate"] * 3}), 1),  # null and non-numeric ids
    (pl.DataFrame(), 0),  # no columns at all (a phantom all-null row before)
    (pl.DataFrame({"record_id": [5], "reason": ["duplicate"], "image_file": [["a.jpg", "b.jpg"]]}), 0),  # a list
])
def test_a_removals_table_of_another_shape_never_fails_the_page_or_the_version(tmp_path, table, served_items):
    """Before: 500 ValidationError from /curation/removals, or (a list column) the whole version refused (503)."""
    build_sample_artifact(tmp_path, HashEncoder(), rows=30)
    table.write_parquet(curated_dir(tmp_path) / load_version(tmp_path).version / REMOVALS_FILE)
    with TestClient(create_app(make_settings(tmp_path), encoder_loader=lambda m, d: HashEncoder())) as c:
        assert c.post("/search", json={"query": "lampe", "top_k": 3}).status_code == 200
        r = c.get("/curation/removals")
        assert r.status_code == 200, r.text
        assert len(r.json()["items"]) == served_items


def test_a_negative_category_is_not_an_alias_of_unlabelled(tmp_path):
    """Unlabelled rows are indexed under a negative key: before, category -1 searched them (undocumented)."""
    from curation_dagster.core.artifacts import build_probe, publish_curated_version

    build_sample_artifact(tmp_path, HashEncoder(), rows=30)
    v = load_version(tmp_path)
    unlabelled = pl.int_range(pl.len()) < 10
    records = v.records.with_columns(pl.when(unlabelled).then(None).otherwise(pl.col(c)).alias(c)
                                     for c in ("prdtypecode", "category"))
    manifest = {k: val for k, val in v.manifest.items() if k not in ("version", "count", "dim", "created_at")}
    manifest["probe"] = build_probe(records["designation"].to_list())
    publish_curated_version(tmp_path, records, v.image_emb, v.text_emb, manifest)
    with TestClient(create_app(make_settings(tmp_path), encoder_loader=lambda m, d: HashEncoder())) as c:
        hits = c.post("/search", json={"query": "lampe", "top_k": 3, "category": "unlabelled"}).json()
        assert len(hits) == 3 and {h["prdtypecode"] for h in hits} == {None}
        for cat in (-1, 0):
            r = c.post("/search", json={"query": "lampe", "top_k": 3, "category": cat})
            assert r.status_code == 404 and "unknown category" in r.json()["detail"]


# -------------------------------------------------------------------------------------------------------- /images


def test_images_serves_removed_rows_and_kept_rows_but_not_a_stray_file(client, removals, artifacts):
    for name in removals["image_file"].to_list() + removals["kept_image_file"].drop_nulls().to_list():
        r = client.get(f"/images/{name}")
        assert r.status_code == 200 and r.content == (images_dir(artifacts) / name).read_bytes(), name
    assert (images_dir(artifacts) / STRAY).is_file()
    assert client.get(f"/images/{STRAY}").status_code == 404
