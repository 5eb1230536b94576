"""The optional int8 text tower: guarded by a fidelity probe, query side only."""
from __future__ import annotations

import numpy as np
from api_helpers import SAMPLE_DIR, HashEncoder, make_settings
from fastapi.testclient import TestClient

from api import quantize
from api.main import create_app
from api.quantize import quantize_text_tower

TEXTS = ["armoire chambre enfants", "lampe torche étanche camping", "figurine super-héros 15 cm", "x"]


def _fresh_encoder():
    from curation_dagster.core.encoder import ClipEncoder

    # fresh: quantization swaps modules in place; fp32: on a CPU with native bf16 the encoder may pick bf16
    # autocast (by capability), under which int8 is not applied at all (test_int8_not_under_bf16_autocast).
    return ClipEncoder.load("tiny-random", "cpu", precision="fp32")


def test_int8_guard_reverts_or_applies(monkeypatch):
    enc = _fresh_encoder()
    paths = sorted((SAMPLE_DIR / "images" / "image_train").glob("*.jpg"))[:2]
    ref_t, ref_i = enc.encode_texts(TEXTS), enc.encode_images(paths)

    monkeypatch.setattr(quantize, "MIN_COSINE", 0.99999)
    desc = quantize_text_tower(enc, "on")
    assert desc.startswith("float32") and "drifted" in desc
    np.testing.assert_array_equal(enc.encode_texts(TEXTS), ref_t)  # fp32 modules restored

    monkeypatch.setattr(quantize, "MIN_COSINE", 0.98)
    desc = quantize_text_tower(enc, "on")
    assert desc.startswith("int8 dynamic"), desc
    got = enc.encode_texts(TEXTS)
    assert not np.array_equal(got, ref_t)
    assert np.sum(got * ref_t, axis=1).min() >= 0.98
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1, atol=1e-5)
    np.testing.assert_array_equal(enc.encode_images(paths), ref_i)  # the image tower is untouched


def test_int8_not_under_bf16_autocast():
    import torch

    enc = _fresh_encoder()
    enc._autocast_dtype = torch.bfloat16
    assert quantize_text_tower(enc, "on").startswith("unchanged (the encoder runs bf16 autocast")


def test_int8_not_applicable_or_off():
    assert quantize_text_tower(HashEncoder(), "on").startswith("unchanged")
    assert quantize_text_tower(HashEncoder(), "off").startswith("float32")


def test_service_with_int8_encodes_queries_one_at_a_time(sample_artifacts_dir, monkeypatch):
    monkeypatch.setattr(quantize, "MIN_COSINE", 0.98)
    enc = _fresh_encoder()
    app = create_app(make_settings(sample_artifacts_dir, text_int8="on"), encoder_loader=lambda m, d: enc)
    with TestClient(app) as client:
        ready = client.get("/readyz").json()
        assert ready["text_encoder"].startswith("int8 dynamic")
        assert client.get("/stats").json()["text_encoder"] == ready["text_encoder"]
        assert app.state.service._batcher._max_batch == 1
        r = client.post("/search", json={"query": "armoire chambre enfants", "top_k": 5})
        assert r.status_code == 200 and len(r.json()) == 5
