"""Both families end to end: the Dagster pipeline with CURATION_CLIP_MODEL=tiny-random-siglip -> the published
artifact (manifest names the model) -> the API serving text and image search with the SigLIP encoder; and the
int8 text tower for each family (no family switch in api/quantize.py: the encoder names its tower's modules)."""
from __future__ import annotations


import numpy as np
import pytest
from api_helpers import SAMPLE_DIR
from fastapi.testclient import TestClient

from api import quantize
from api.quantize import quantize_text_tower
from curation_dagster.core.artifacts import load_version
from curation_dagster.core.settings import TINY_RANDOM, TINY_RANDOM_SIGLIP
from pipeline_helpers import materialize_all

SMALL = {"ops": {"sampled_products": {"config": {"per_class_cap": 3}}}}  # 27 classes x 3 rows: well under a minute


@pytest.fixture(scope="module")
def siglip_run(tmp_path_factory):
    artifacts = tmp_path_factory.mktemp("siglip_artifacts")
    result = materialize_all(SAMPLE_DIR, artifacts, run_config=SMALL, model=TINY_RANDOM_SIGLIP)
    return artifacts, result


def _env(monkeypatch, artifacts, model: str | None) -> None:
    monkeypatch.setenv("CURATION_ARTIFACTS_DIR", str(artifacts))
    monkeypatch.setenv("CURATION_DEVICE", "cpu")
    monkeypatch.setenv("CURATION_API_RELOAD_INTERVAL_S", "0")
    monkeypatch.setenv("CURATION_API_TEXT_INT8", "off")
    if model is None:
        monkeypatch.delenv("CURATION_CLIP_MODEL", raising=False)
    else:
        monkeypatch.setenv("CURATION_CLIP_MODEL", model)


def test_pipeline_to_api_with_tiny_random_siglip(siglip_run, monkeypatch):
    from api.main import create_app
    from api.settings import ApiSettings

    artifacts, result = siglip_run
    version = load_version(artifacts)
    assert version.manifest["model"] == TINY_RANDOM_SIGLIP
    assert version.dim == 128  # SigLIP tiny: hidden size = embedding size
    emb = result.output_for_node("clip_embeddings")
    assert emb.meta["model_name"] == TINY_RANDOM_SIGLIP and emb.meta["meaningless"]
    assert emb.meta["model_identity"].endswith("#siglip")
    np.testing.assert_allclose(np.linalg.norm(version.image_emb, axis=1), 1, atol=1e-5)

    _env(monkeypatch, artifacts, TINY_RANDOM_SIGLIP)
    with TestClient(create_app(ApiSettings.from_env())) as client:
        ready = client.get("/readyz").json()
        assert ready["version"] == version.version and ready["model"] == TINY_RANDOM_SIGLIP and ready["meaningless"]
        hits = client.post("/search", json={"query": "lampe torche étanche camping", "top_k": 5}).json()
        assert len(hits) == 5 and [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
        curated = set(version.records["record_id"].to_list())
        assert all(h["record_id"] in curated for h in hits)
        # image search: a curated image is its own best match (the API preprocesses it the SigLIP way)
        rid = version.records["record_id"][0]
        rec = client.get(f"/record/{rid}").json()
        img = client.get(rec["image_url"].replace("http://testserver", "")).content
        found = client.post("/search/image", files={"file": ("q.jpg", img, "image/jpeg")}).json()
        assert found[0]["record_id"] == rid and found[0]["score"] > 0.99
        assert client.get("/stats").json()["model"] == TINY_RANDOM_SIGLIP


def test_api_refuses_a_model_of_another_family_than_the_artifact(siglip_run, monkeypatch):
    from api.main import create_app
    from api.settings import ApiSettings

    artifacts, _ = siglip_run
    _env(monkeypatch, artifacts, TINY_RANDOM)  # a CLIP configured, a SigLIP artifact
    with pytest.raises(Exception, match="tiny-random"):
        with TestClient(create_app(ApiSettings.from_env())):
            pass


@pytest.mark.parametrize("model", [TINY_RANDOM, TINY_RANDOM_SIGLIP])
def test_int8_text_tower_for_each_family(model, monkeypatch):
    from curation_dagster.core.encoder import DualEncoder

    enc = DualEncoder.load(model, "cpu", precision="fp32")
    paths = sorted((SAMPLE_DIR / "images" / "image_train").glob("*.jpg"))[:2]
    texts = ["armoire chambre enfants", "lampe torche étanche camping", "x"]
    ref_t, ref_i = enc.encode_texts(texts), enc.encode_images(paths)
    monkeypatch.setattr(quantize, "MIN_COSINE", 0.99999)
    assert "drifted" in quantize_text_tower(enc, "on")
    np.testing.assert_array_equal(enc.encode_texts(texts), ref_t)  # every swapped module restored
    monkeypatch.setattr(quantize, "MIN_COSINE", 0.9)
    desc = quantize_text_tower(enc, "on")
    assert desc.startswith("int8 dynamic"), desc
    got = enc.encode_texts(texts)
    assert not np.array_equal(got, ref_t) and np.sum(got * ref_t, axis=1).min() >= 0.9
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1, atol=1e-5)
    np.testing.assert_array_equal(enc.encode_images(paths), ref_i)  # the image tower is untouched
    import torch.nn as nn

    tower = [getattr(owner, attr) for owner, attr in enc.text_tower_modules()]
    assert not any(type(m) is nn.Linear for t in tower for m in t.modules())  # every text Linear is int8
