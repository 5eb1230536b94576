"""The whole graph on real data with tiny-random: the artifact contract, the embedding cache, planted duplicates."""
from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest
from PIL import Image

from curation_dagster.core.artifacts import list_versions, load_version, read_current_version_name

from pipeline_helpers import SAMPLE_DIR, materialize_all, up_to_publication

# Everything up to and including publication (the evaluation is tested on its own).
PUBLISHED = up_to_publication()


def _meta(result, key):
    for e in result.get_asset_materialization_events():
        if e.asset_key.to_user_string() == key:
            return e.materialization.metadata
    raise KeyError(key)


def test_full_graph_on_bundled_sample(pipeline_run):
    artifacts, result = pipeline_run
    assert result.success
    assert all(e.passed for e in result.get_asset_check_evaluations()), \
        [(e.check_name, e.metadata) for e in result.get_asset_check_evaluations() if not e.passed]
    clean = result.output_for_node("clean_products", "clean_products")
    curated = result.output_for_node("curated_products", "curated_products")
    removals = result.output_for_node("curated_products", "curation_removals")
    assert clean.height == 547
    assert clean.height == curated.height + removals.height

    version = load_version(artifacts)
    m = version.manifest
    # contract: row i of records ↔ row i of the embeddings; unit norms; counts add up
    assert version.records["record_id"].to_list() == curated["record_id"].to_list()
    assert version.image_emb.dtype == np.float32 and version.text_emb.dtype == np.float32
    assert np.allclose(np.linalg.norm(version.image_emb, axis=1), 1, atol=1e-3)
    assert np.allclose(np.linalg.norm(version.text_emb, axis=1), 1, atol=1e-3)
    assert m["model"] == "tiny-random" and m["meaningless"] is True and "meaningless" in m["note"].lower()
    assert m["count"] == curated.height and m["dim"] == version.image_emb.shape[1]
    c = m["counts"]
    assert (c["raw"], c["sampled"], c["clean"]) == (547, 547, 547)
    assert c["clean"] == c["curated"] + c["removed_misaligned"] + c["removed_duplicate"]
    assert c["removed_misaligned"] == removals.filter(pl.col("reason") == "misaligned").height > 0
    # per-class alignment filter: every class survives
    assert curated["prdtypecode"].n_unique() == 27
    # the stored alignment score is the cosine of the stored vectors
    cos = (version.image_emb * version.text_emb).sum(axis=1)
    assert np.allclose(cos, version.records["alignment_score"].to_numpy(), atol=1e-5)
    # embeddings in the artifact are the curated rows' embeddings from clip_embeddings
    emb = result.output_for_node("clip_embeddings")
    sel = emb.select(curated["record_id"].to_list())
    assert np.array_equal(sel.image, version.image_emb)
    # every clean photo got its model-input thumbnail in cleaning, and the embedding stage read those
    assert clean["thumb_path"].is_not_null().all()
    assert all(p.startswith(str(artifacts / "thumbs")) for p in clean["thumb_path"].to_list())
    assert emb.meta["images_from_thumbnails"] == clean.height
    # images referenced by the artifact exist
    assert all((artifacts / "images" / f).is_file() for f in version.records["image_file"])
    # every removed row is in the version's removals table, with what a reviewer needs to judge it
    from curation_dagster.core.artifacts import load_removals

    review = load_removals(version)
    assert sorted(review["record_id"].to_list()) == sorted(removals["record_id"].to_list())
    assert review["image_file"].null_count() == 0 and review["designation"].null_count() == 0
    dup = review.filter(pl.col("reason") == "duplicate")
    assert dup.height == 0 or dup["kept_image_file"].null_count() == 0
    # the evaluation report exists for this version
    report_dir = artifacts / "reports" / version.version
    for name in ("report.md", "metrics.json"):
        assert (report_dir / name).is_file()
    split = json.loads((report_dir / "metrics.json").read_text())["split"]
    assert split["grouped_by_duplicates"] and split["duplicate_groups"] >= 0  # copies never straddle the split
    assert len(list(report_dir.glob("*.png"))) >= 4
    report = (report_dir / "report.md").read_text()
    assert "meaningless" in report.splitlines()[0] + report.splitlines()[1] + report[:600]
    assert "curated (n=" in _meta(result, "evaluation_report")["verdict"].value


def test_rematerialization_hits_cache_and_keeps_old_version(tmp_path):
    source = tmp_path / "src"
    import shutil

    shutil.copytree(SAMPLE_DIR, source)
    artifacts = tmp_path / "artifacts"
    small = {"ops": {"sampled_products": {"config": {"per_class_cap": 3}}}}
    first = materialize_all(source, artifacts, run_config=small, selection=PUBLISHED)
    v1 = read_current_version_name(artifacts)

    def files(version):  # the version's files and its pinned images, byte for byte
        d = artifacts / "curated" / version
        return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}

    v1_files = files(v1)
    assert any(name.startswith("images/") for name in v1_files)
    m1 = _meta(first, "clip_embeddings")
    assert m1["images_encoded"].value == 81 and m1["image_cache_hits"].value == 0

    thumbs = sorted((artifacts / "thumbs").rglob("*.jpg"))
    assert len(thumbs) == 81
    stale = thumbs[0].parent / ("f" * 64 + "-250x250-box-q95.jpg")  # of a product no longer in the sample
    stale.write_bytes(thumbs[0].read_bytes())

    second = materialize_all(source, artifacts, run_config=small, selection=PUBLISHED)
    assert not stale.exists() and _meta(second, "clean_products")["thumbnails_pruned"].value == 1
    assert sorted((artifacts / "thumbs").rglob("*.jpg")) == thumbs
    m2 = _meta(second, "clip_embeddings")
    assert m2["image_cache_hits"].value == 81 and m2["images_encoded"].value == 0
    assert m2["text_cache_hits"].value == 81 and m2["texts_encoded"].value == 0
    v2 = read_current_version_name(artifacts)
    assert v2 != v1 and sorted(list_versions(artifacts)) == sorted([v1, v2])
    # the old version is untouched, byte for byte
    assert files(v1) == v1_files
    a, b = load_version(artifacts, v1), load_version(artifacts, v2)
    assert np.array_equal(a.image_emb, b.image_emb)

    # one changed title → exactly one text re-encoded
    x = pl.read_csv(source / "X_sample.csv", infer_schema=False)
    ids = set(pl.read_parquet(artifacts / "tables" / "sampled_products.parquet")["record_id"].cast(pl.Utf8))
    target = next(i for i, p in enumerate(x["productid"]) if p in ids)
    x = x.with_columns(pl.when(pl.int_range(pl.len()) == target).then(pl.lit("Titre modifié pour le test"))
                       .otherwise(pl.col("designation")).alias("designation"))
    x.write_csv(source / "X_sample.csv")
    third = materialize_all(source, artifacts, run_config=small, selection=PUBLISHED)
    m3 = _meta(third, "clip_embeddings")
    assert m3["texts_encoded"].value == 1 and m3["images_encoded"].value == 0


def test_planted_duplicates_found_through_the_pipeline(source_builder, tmp_path):
    b = source_builder(40)
    rows = b.rows
    # (1) a byte copy of row 0's image under a new productid, with a title of its own
    copy = dict(rows[0], index="900001", productid="990000001", imageid="990000001",
                designation="Coffret cadeau vintage en bois massif, édition limitée", description="")
    b.copy_image(copy, src=rows[0])
    # (2) row 1's image re-encoded at JPEG quality 40 and resized, under a new productid, with a title of its own
    reenc = dict(rows[1], index="900002", productid="990000002", imageid="990000002",
                 designation="Kit de réparation pour vélo de route, rustines et démonte-pneus", description="")
    with Image.open(b.image_path(rows[1])) as im:
        im.convert("RGB").resize((320, 320)).save(b.image_path(reenc), format="JPEG", quality=40)
    all_rows = rows + [copy, reenc]
    b.write(x_rows=all_rows, y_rows=all_rows)
    artifacts = tmp_path / "artifacts"
    result = materialize_all(b.root, artifacts, run_config={"ops": {"curated_products": {"config": {
        "drop_fraction": 0.0}}}}, selection=PUBLISHED)
    removals = result.output_for_node("curated_products", "curation_removals")
    curated = result.output_for_node("curated_products", "curated_products")
    emb = result.output_for_node("clip_embeddings")
    scores = dict(zip(emb.ids["record_id"].to_list(), (emb.image * emb.text).sum(axis=1).tolist()))
    dups = removals.filter(pl.col("reason") == "duplicate")
    pairs = {frozenset((r["record_id"], r["duplicate_of"])): r["evidence"] for r in dups.iter_rows(named=True)}
    a, a2 = int(rows[0]["productid"]), 990000001
    c, c2 = int(rows[1]["productid"]), 990000002
    assert frozenset((a, a2)) in pairs and pairs[frozenset((a, a2))] in {"sha256", "image"}
    assert frozenset((c, c2)) in pairs and pairs[frozenset((c, c2))] == "image"
    assert dups.height == 2, dups  # no false merges among the 40 real, distinct products
    for x, y in ((a, a2), (c, c2)):
        kept = x if scores[x] > scores[y] or (scores[x] == scores[y] and x < y) else y
        assert kept in curated["record_id"].to_list()
        assert dups.filter(pl.col("duplicate_of") == kept).height == 1
    manifest = json.loads((artifacts / "curated" / read_current_version_name(artifacts) / "manifest.json").read_text())
    assert manifest["counts"]["removed_duplicate"] == 2


def test_api_serves_the_pipeline_built_artifact(pipeline_run):
    """The service over the artifact that the Dagster graph itself published (not a hand-built one)."""
    from fastapi.testclient import TestClient

    from api.main import create_app
    from api.settings import ApiSettings

    artifacts, result = pipeline_run
    version = load_version(artifacts)
    settings = ApiSettings(artifacts_dir=artifacts, device="cpu", reload_interval_s=0, text_int8="off")
    with TestClient(create_app(settings)) as client:
        assert client.get("/readyz").json()["version"] == version.version
        hits = client.post("/search", json={"query": "armoire chambre enfants", "top_k": 5}).json()
        assert len(hits) == 5 and [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
        curated_ids = set(version.records["record_id"].to_list())
        assert all(h["record_id"] in curated_ids for h in hits)
        assert client.get(hits[0]["image_url"].replace("http://testserver", "")).status_code == 200
        stats = client.get("/stats").json()
        assert stats["num_records"] == version.count
        assert stats["counts"]["curated"] == version.manifest["counts"]["curated"]
        removed = result.output_for_node("curated_products", "curation_removals")["record_id"][0]
        assert client.get(f"/record/{removed}").status_code == 404  # removed rows are not served


def test_a_later_run_never_changes_the_pictures_of_the_served_version(source_builder, tmp_path):
    """images/<name> is shared by every run: a rerun replaced it (a changed source photo; a CMYK original put back
    over its RGB conversion) before its checks, whether or not it would publish. The served version now pins its
    own images: /images keeps serving the very pictures its embeddings were made from."""
    from fastapi.testclient import TestClient

    from api.main import create_app
    from api.settings import ApiSettings

    b = source_builder(30)
    cmyk, changed = b.rows[0], b.rows[1]
    with Image.open(b.image_path(cmyk)) as im:
        im.convert("CMYK").save(b.image_path(cmyk), format="JPEG")
    b.write()
    artifacts = tmp_path / "artifacts"
    materialize_all(b.root, artifacts, selection=PUBLISHED)
    version = load_version(artifacts)
    served = {r["record_id"]: r["image_file"] for r in version.records.iter_rows(named=True)}
    names = [served[int(r["productid"])] for r in (cmyk, changed)]
    pinned = {n: (version.path / "images" / n).read_bytes() for n in names}
    assert all((artifacts / "images" / n).read_bytes() == pinned[n] for n in names)
    Image.new("RGB", (500, 500), (255, 0, 0)).save(b.image_path(changed), format="JPEG")
    materialize_all(b.root, artifacts, selection=["raw_products", "sampled_products", "product_images"])
    assert read_current_version_name(artifacts) == version.version
    assert all((artifacts / "images" / n).read_bytes() != pinned[n] for n in names)  # the shared files did change
    settings = ApiSettings(artifacts_dir=artifacts, device="cpu", reload_interval_s=0, text_int8="off")
    with TestClient(create_app(settings)) as client:
        for n in names:
            r = client.get(f"/images/{n}")
            assert r.status_code == 200 and r.content == pinned[n]
            assert r.headers["x-content-type-options"] == "nosniff"
        with Image.open(version.path / "images" / names[0]) as im:
            assert im.mode == "RGB"


_RUN_SCRIPT = r"""
import json, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[4])
import curation_dagster.assets.source as src
real = src.read_source
times = {}
def slow(*a, **k):
    times["read_start"] = time.time()
    Path(sys.argv[2]).touch()
    out = real(*a, **k)
    time.sleep(float(sys.argv[3]))
    times["read_end"] = time.time()
    return out
src.read_source = slow
from pipeline_helpers import SAMPLE_DIR, materialize_all
import dagster as dg
lease = sys.argv[5]
instance = dg.DagsterInstance.get() if lease == "run" else None  # run-bound: the run's status in a shared instance
materialize_all(SAMPLE_DIR, Path(sys.argv[1]), selection=["raw_products", "sampled_products"], run_lease=lease,
                instance=instance)
print("TIMES " + json.dumps(times))
"""


@pytest.mark.parametrize("lease", ["process", "run"])
def test_a_second_run_on_the_same_artifacts_waits_for_the_first(tmp_path, lease):
    """Runs share the intermediate tables: before the run lock, run B read and wrote raw_products while run A was
    still using them (A's blocking check then failed on B's rows). ``run``: the sharded code location's lease, held
    while the Dagster instance (shared by both processes, as a deployment's is) says run A is running; before it,
    that location had no lock at all."""
    import os
    import subprocess
    import sys
    import time
    from pathlib import Path

    tests = str(Path(__file__).resolve().parent)
    artifacts = tmp_path / "artifacts"

    def start(name: str, hold_s: float):
        env = dict(os.environ, DAGSTER_HOME=str(tmp_path / "dagster_home"))
        (tmp_path / "dagster_home").mkdir(exist_ok=True)
        return subprocess.Popen([sys.executable, "-c", _RUN_SCRIPT, str(artifacts), str(tmp_path / name), str(hold_s),
                                 tests, lease], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)

    a = start("a_reading", 6.0)
    deadline = time.time() + 120
    while not (tmp_path / "a_reading").exists():
        assert a.poll() is None, a.communicate()[1][-2000:]
        assert time.time() < deadline
        time.sleep(0.1)
    b = start("b_reading", 0.0)
    outs = [p.communicate(timeout=300) for p in (a, b)]
    for p, (out, err) in zip((a, b), outs):
        assert p.returncode == 0, err[-3000:]
    ta, tb = (json.loads(out.split("TIMES ", 1)[1]) for out, _ in outs)
    assert tb["read_start"] >= ta["read_end"], (ta, tb)
    assert "waits" in outs[1][1]  # B said why it waited
