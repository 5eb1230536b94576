"""Query encoding through ONNX Runtime (api/onnx_text.py) and the query-embedding cache (api/service.py).

Correctness only (no timings): ORT ≈ torch on both families, the backend setting, the fallbacks, the cache,
concurrency.
"""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import numpy as np
import pytest
from api_helpers import make_settings
from fastapi.testclient import TestClient

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from api import onnx_text
from api.main import create_app
from api.onnx_text import OrtTextEncoder, choose_text_backend, prepare_graphs
from api.service import QueryCache, Snapshot, normalize_query

TEXTS = ["armoire chambre enfants", "lampe torche étanche camping", "figurine super-héros 15 cm", "x",
         "Lot de 12 crayons de couleur pour enfants avec taille-crayon et trousse de transport",
         "coussin décoratif " * 30]
MANY = [("mot " * (i % 11 + 1)) + f"numéro {i} lampe" + " étanche" * (i % 4) for i in range(48)]


def _load(name: str):
    from curation_dagster.core.encoder import ClipEncoder

    # fp32: the torch reference must not be bf16 autocast (chosen on CPUs with native bf16)
    return ClipEncoder.load(name, "cpu", precision="fp32")


@pytest.fixture(autouse=True)
def _private_onnx_cache(tmp_path_factory, monkeypatch):
    root = tmp_path_factory.getbasetemp() / "onnx-text-cache"  # shared by the tests of a session: exports reused
    monkeypatch.setattr(onnx_text, "_cache_root", lambda: root)
    return root


@pytest.fixture(scope="module", params=["tiny-random", "tiny-random-siglip"])
def family_encoder(request):
    return _load(request.param)


def _min_cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.min(np.sum(a * b, axis=1)))


def test_ort_matches_torch_fp32_and_int8(family_encoder, tmp_path):
    enc = family_encoder
    ref = enc.encode_texts(TEXTS)
    graphs = prepare_graphs(enc, want_int8=True, cache_root=tmp_path)
    assert "exported" in graphs.where and graphs.fp32.is_file() and graphs.int8_dynamic.is_file()
    assert graphs.int8_static.is_file()
    fp32 = OrtTextEncoder(enc, graphs.fp32).encode_texts(TEXTS)
    assert fp32.dtype == np.float32 and fp32.shape == ref.shape
    np.testing.assert_allclose(np.linalg.norm(fp32, axis=1), 1, atol=1e-5)
    assert _min_cos(fp32, ref) >= 0.9999
    dyn = OrtTextEncoder(enc, graphs.int8_dynamic)
    alone = np.concatenate([dyn.encode_texts([t]) for t in TEXTS])  # one per run, as served
    assert _min_cos(alone, ref) >= 0.99
    static = OrtTextEncoder(enc, graphs.int8_static)
    alone = np.concatenate([static.encode_texts([t]) for t in TEXTS])
    batched = static.encode_texts(TEXTS)  # padded to the longest text: served like this
    assert _min_cos(alone, ref) >= 0.99 and _min_cos(batched, ref) >= 0.99
    assert _min_cos(alone, batched) >= 0.99999  # calibrated ranges: a vector does not depend on its neighbours
    # second preparation: from the cache (same model identity), no re-export
    again = prepare_graphs(enc, want_int8=True, cache_root=tmp_path)
    assert again.where.startswith("cached") and again.fp32 == graphs.fp32
    assert graphs.where.endswith("torch.export graph") and again.where.endswith("torch.export graph")
    assert prepare_graphs(enc, want_int8=False, cache_root=tmp_path).int8_static is None
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]  # nothing half-written left
    # static int8 quantizes the weight MatMuls only; attention's activation x activation products stay float
    import onnx

    nodes = onnx.load(str(graphs.int8_static), load_external_data=False).graph.node
    fp32_nodes = onnx.load(str(graphs.fp32), load_external_data=False).graph.node
    layers = enc.model.config.text_config.num_hidden_layers
    assert sum(n.op_type == "MatMul" for n in nodes) == 2 * layers  # Q.K^T and scores.V per layer
    assert sum(n.op_type == "QLinearMatMul" for n in nodes) == sum(n.op_type == "MatMul" for n in fp32_nodes) - 2 * layers


def test_choose_backend_int8_then_fp32_then_torch(family_encoder, monkeypatch):
    enc = family_encoder
    ref = enc.encode_texts(TEXTS)
    b = choose_text_backend(enc, "auto", "auto")
    assert b.backend == "onnx" and b.description.startswith("onnx int8 static") and b.batchable
    assert _min_cos(np.concatenate([b.encode([t]) for t in TEXTS]), ref) >= 0.99
    assert _min_cos(b.encode(TEXTS), ref) >= 0.99

    real_probe = onnx_text.probe_cosine  # static int8 judged unfaithful (as a batch) → dynamic int8, one per run
    monkeypatch.setattr(onnx_text, "probe_cosine", lambda e, r, batched=False: 0.5 if batched else real_probe(e, r))
    b = choose_text_backend(enc, "auto", "auto")
    assert b.description.startswith("onnx int8 dynamic") and not b.batchable
    assert "static int8 probe min cosine 0.5000 < 0.99" in b.description
    assert _min_cos(np.concatenate([b.encode([t]) for t in TEXTS]), ref) >= 0.99

    monkeypatch.setattr(onnx_text, "MIN_COSINE_INT8", 1.01)  # int8 judged unfaithful → fp32 ORT
    b = choose_text_backend(enc, "auto", "auto")
    assert b.description.startswith("onnx float32") and "int8 probe min cosine" in b.description and b.batchable
    assert _min_cos(b.encode(TEXTS), ref) >= 0.9999

    monkeypatch.setattr(onnx_text, "MIN_COSINE_FP32", 1.01)  # neither faithful → torch
    b = choose_text_backend(enc, "onnx", "off")
    assert b.backend == "torch" and "not faithful" in b.description
    np.testing.assert_array_equal(b.encode(TEXTS), ref)


def test_int8_off_gives_fp32_ort(family_encoder):
    b = choose_text_backend(family_encoder, "onnx", "off")
    assert b.description.startswith("onnx float32") and "CURATION_API_TEXT_INT8=off" in b.description


def test_export_failure_falls_back_to_torch(monkeypatch):
    enc = _load("tiny-random")
    ref = enc.encode_texts(TEXTS)

    def broken(*a, **k):
        raise RuntimeError("injected export failure")

    monkeypatch.setattr(onnx_text, "export_text_tower", broken)
    monkeypatch.setattr(onnx_text, "_cache_root", lambda: __import__("pathlib").Path(__import__("tempfile").mkdtemp()))
    b = choose_text_backend(enc, "onnx", "off")
    assert b.backend == "torch" and "injected export failure" in b.description
    assert b.description.startswith("float32")
    np.testing.assert_array_equal(b.encode(TEXTS), ref)


def test_a_damaged_cached_graph_is_exported_again_not_served_by_torch_for_good(monkeypatch, tmp_path):
    """A graph truncated in the cache (a full disk, a bad copy): before, every start fell back to torch for good."""
    enc = _load("tiny-random")
    monkeypatch.setattr(onnx_text, "_cache_root", lambda: tmp_path / "cache")
    first = choose_text_backend(enc, "onnx", "off")
    assert first.backend == "onnx"
    graph = prepare_graphs(enc, False, tmp_path / "cache").fp32
    graph.write_bytes(graph.read_bytes()[:1000])
    again = choose_text_backend(enc, "onnx", "off")
    assert again.backend == "onnx" and "exported to" in again.description, again.description
    # /readyz and /stats show the description to anyone: no file-system paths in it (the log has them)
    assert str(tmp_path) not in first.description and str(tmp_path) not in again.description
    assert graph.stat().st_size > 1000
    np.testing.assert_allclose(again.encode(TEXTS), first.encode(TEXTS), atol=1e-5)


def test_torchscript_exporter_when_torch_export_fails(monkeypatch, tmp_path):
    """torch.export cannot trace every model, or onnxscript is missing: the TorchScript exporter then makes the graph
    (same maths, more shape bookkeeping), the model's attention is back to what it was, the service still gets
    faithful int8 - and once onnxscript is there, that fallback graph is not reused from the cache."""
    import importlib.metadata

    import onnx
    import torch

    enc = _load("tiny-random")
    ref = enc.encode_texts(TEXTS)
    attention = enc.model.config._attn_implementation
    clean = onnx.load(str(prepare_graphs(enc, want_int8=False, cache_root=tmp_path / "a").fp32)).graph.node
    real_export = torch.onnx.export
    seen = []

    def no_dynamo(*a, **k):
        if k.get("dynamo"):
            seen.append(enc.model.config._attn_implementation)  # what the export saw
            raise ModuleNotFoundError("No module named 'onnxscript'")
        return real_export(*a, **k)

    real_version = importlib.metadata.version

    def version(name):
        if name == "onnxscript":
            raise importlib.metadata.PackageNotFoundError(name)
        return real_version(name)

    monkeypatch.setattr(torch.onnx, "export", no_dynamo)
    monkeypatch.setattr(importlib.metadata, "version", version)
    graphs = prepare_graphs(enc, want_int8=True, cache_root=tmp_path / "b")
    assert seen == ["eager"] and enc.model.config._attn_implementation == attention
    assert graphs.where.endswith("TorchScript graph")
    assert prepare_graphs(enc, want_int8=True, cache_root=tmp_path / "b").where.endswith("TorchScript graph")
    old = onnx.load(str(graphs.fp32)).graph.node
    # the reason for torch.export: no Shape -> Gather -> Concat chain per reshape
    assert sum(n.op_type == "Shape" for n in clean) < sum(n.op_type == "Shape" for n in old) / 2
    assert _min_cos(OrtTextEncoder(enc, graphs.fp32).encode_texts(TEXTS), ref) >= 0.9999
    static = OrtTextEncoder(enc, graphs.int8_static)
    assert _min_cos(np.concatenate([static.encode_texts([t]) for t in TEXTS]), ref) >= 0.99
    monkeypatch.undo()  # onnxscript installed: a new key, exported by torch.export, not the cached fallback
    again = prepare_graphs(enc, want_int8=True, cache_root=tmp_path / "b")
    assert again.where.startswith("exported") and again.where.endswith("torch.export graph"), again.where
    assert again.fp32.parent != graphs.fp32.parent


def test_no_onnxruntime_falls_back_to_torch(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *a, **k):
        if name == "onnxruntime":
            raise ImportError("no onnxruntime", name="onnxruntime")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    b = choose_text_backend(SimpleNamespace(encode_texts=lambda t: None), "auto", "off")
    assert b.backend == "torch" and "onnxruntime/onnx not installed" in b.description


def test_cpu_with_native_bf16_still_serves_static_int8(sample_artifacts_dir, monkeypatch):
    """The Intel (AVX-512 BF16 / AMX) start-up failure of issue 11: the service's encoder chose bf16 autocast and the
    int8 text tower then failed ("expected scalar type Float but found BFloat16"). The CPU is made to report native
    bf16, the service loads its encoder as it does in production (CURATION_PRECISION=auto), and must come up on the
    static int8 ONNX tower, its vectors within 0.99 of torch fp32; the torch fallback must serve too."""
    from curation_dagster.core import encoder as encoder_mod
    from curation_dagster.core.encoder import ClipEncoder

    ref = _load("tiny-random").encode_texts(TEXTS)
    monkeypatch.setattr(encoder_mod, "cpu_has_native_bf16", lambda: True)
    for backend, prefix in (("auto", "onnx int8 static"), ("torch", "")):
        enc = ClipEncoder.load("tiny-random", "cpu", precision="auto")
        assert enc.precision == "bf16", enc.dtype_used  # the Intel path: bf16 autocast for the pipeline's batches
        app = create_app(make_settings(sample_artifacts_dir, text_backend=backend, text_int8="auto"),
                         encoder_loader=lambda m, d, e=enc: e)
        with TestClient(app) as client:
            ready = client.get("/readyz")
            assert ready.status_code == 200, ready.text
            assert ready.json()["text_encoder"].startswith(prefix), ready.json()["text_encoder"]
            r = client.post("/search", json={"query": TEXTS[1], "top_k": 3})
            assert r.status_code == 200 and len(r.json()) == 3
            served = app.state.service.snapshot().batcher.encode(TEXTS[1])
            assert float(served @ ref[1]) >= (0.99 if backend == "auto" else 0.98)


def test_backend_setting_is_honoured(sample_artifacts_dir):
    for backend, int8, prefix in (("torch", "off", "float32"), ("onnx", "auto", "onnx int8"), ("auto", "off", "onnx float32")):
        enc = _load("tiny-random")  # fresh: the torch path may swap modules in place
        app = create_app(make_settings(sample_artifacts_dir, text_backend=backend, text_int8=int8),
                         encoder_loader=lambda m, d, enc=enc: enc)
        with TestClient(app) as client:
            ready = client.get("/readyz").json()
            assert ready["text_encoder"].startswith(prefix), (backend, ready["text_encoder"])
            assert client.get("/stats").json()["text_encoder"] == ready["text_encoder"]
            if backend == "torch":
                assert "CURATION_API_TEXT_BACKEND=torch" in ready["text_encoder"]
                assert app.state.service._batcher._encode == enc.encode_texts
            elif int8 == "auto":
                assert ready["text_encoder"].startswith("onnx int8 static")
                assert app.state.service._batcher._max_batch == 32  # calibrated int8: micro-batched
            r = client.post("/search", json={"query": "armoire chambre enfants", "top_k": 5})
            assert r.status_code == 200 and len(r.json()) == 5


def test_settings_from_env(monkeypatch, tmp_path):
    from api.settings import ApiSettings

    monkeypatch.setenv("CURATION_ARTIFACTS_DIR", str(tmp_path))
    s = ApiSettings.from_env()
    assert s.text_backend == "auto" and s.query_cache_size == 1024
    monkeypatch.setenv("CURATION_API_TEXT_BACKEND", "torch")
    monkeypatch.setenv("CURATION_API_QUERY_CACHE_SIZE", "0")
    s = ApiSettings.from_env()
    assert s.text_backend == "torch" and s.query_cache_size == 0
    monkeypatch.setenv("CURATION_API_TEXT_BACKEND", "tensorrt")
    with pytest.raises(ValueError, match="CURATION_API_TEXT_BACKEND"):
        ApiSettings.from_env()


# ------------------------------------------------------------------------------------------------ query cache


class _CountingBatcher:
    def __init__(self):
        self.calls: list[str] = []
        self.lock = threading.Lock()

    def encode(self, text: str) -> np.ndarray:
        with self.lock:
            self.calls.append(text)
        v = np.random.default_rng(abs(hash(text)) % 2**32).standard_normal(8).astype(np.float32)
        return v / np.linalg.norm(v)


def _snap(version: str, batcher, cache) -> Snapshot:
    return Snapshot(corpus=SimpleNamespace(name=version), encoder=None, batcher=batcher, cache=cache)


def test_cache_identical_bounded_and_keyed_by_version():
    batcher, cache = _CountingBatcher(), QueryCache(2)
    v1 = _snap("v1", batcher, cache)
    a = v1.encode_text("lampe torche")
    assert v1.encode_text("  lampe   torche ") is a  # normalised key: a hit, the very same (read-only) vector
    assert not a.flags.writeable and batcher.calls == ["lampe torche"]
    v1.encode_text("armoire")
    v1.encode_text("coussin")  # third distinct query: the least recently used ("lampe torche") is evicted
    assert len(cache) == 2
    b = v1.encode_text("lampe torche")
    assert batcher.calls.count("lampe torche") == 2 and np.array_equal(a, b)
    v2 = _snap("v2", batcher, cache)  # a new served version never hits the old entries
    v2.encode_text("lampe torche")
    assert batcher.calls.count("lampe torche") == 3
    assert cache.hits == 1


def test_cache_off():
    batcher = _CountingBatcher()
    for cache in (None, QueryCache(0)):
        snap = _snap("v1", batcher, cache)
        snap.encode_text("x")
        snap.encode_text("x")
    assert batcher.calls == ["x"] * 4


def test_normalize_query():
    assert normalize_query("  a\t b\n") == "a b"
    assert normalize_query("e\u0301te") == "\u00e9te"  # NFC


def test_service_cache_through_http(sample_artifacts_dir):
    enc = _load("tiny-random")
    app = create_app(make_settings(sample_artifacts_dir, text_backend="onnx", query_cache_size=8),
                     encoder_loader=lambda m, d: enc)
    with TestClient(app) as client:
        first = client.post("/search", json={"query": "armoire chambre enfants", "top_k": 5}).json()
        cache = app.state.service._query_cache
        assert len(cache) == 1
        second = client.post("/search", json={"query": "armoire  chambre enfants", "top_k": 5}).json()
        assert second == first and cache.hits == 1


# ------------------------------------------------------------------------------------------------ concurrency


@pytest.mark.parametrize("int8", ["auto", "off"])  # static int8 and fp32: both micro-batched
def test_concurrent_equals_sequential_onnx(sample_artifacts_dir, int8):
    enc = _load("tiny-random")
    settings = make_settings(sample_artifacts_dir, text_backend="onnx", text_int8=int8, encode_workers=2,
                             max_batch=8, torch_threads=1)
    app = create_app(settings, encoder_loader=lambda m, d: enc)
    with TestClient(app) as client:
        service = app.state.service
        assert service.text_precision.startswith("onnx int8 static" if int8 == "auto" else "onnx float32")
        snap = service.snapshot()
        alone = {q: snap.encode_text(q) for q in MANY}
        ids_alone = {q: [h["record_id"] for h in client.post("/search", json={"query": q, "top_k": 3}).json()]
                     for q in MANY[:16]}
        barrier = threading.Barrier(16)

        def work(k: int):
            barrier.wait()
            return [(q, snap.encode_text(q)) for q in MANY[k % 7:] + MANY[:k % 7]]

        with ThreadPoolExecutor(16) as pool:
            results = [pair for chunk in pool.map(work, range(16)) for pair in chunk]
            http = list(pool.map(lambda q: (q, client.post("/search", json={"query": q, "top_k": 3})), MANY[:16] * 3))
    for q, v in results:  # batched with whatever else was queued: the same vector as alone (rounding aside)
        assert float(v @ alone[q]) >= 0.99999
    assert all(r.status_code == 200 for _, r in http)
    assert all([h["record_id"] for h in r.json()] == ids_alone[q] for q, r in http)
