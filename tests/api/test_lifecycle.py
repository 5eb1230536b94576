"""Startup without an artifact, model checks, hot reload under load, and broken new versions."""
from __future__ import annotations

import json
import shutil
import threading
import time

import numpy as np
import pytest
from api_helpers import HashEncoder, make_settings, subset_manifest
from fastapi.testclient import TestClient

from api.main import create_app
from api.service import ModelMismatchError
from curation_dagster.core.artifacts import (
    CURRENT_FILENAME,
    NO_ARTIFACT_HINT,
    curated_dir,
    load_version,
    new_version_name,
    publish_curated_version,
    read_current_version_name,
)

SEED = {"query": "armoire chambre enfants", "top_k": 5}


def loader_of(encoder):
    calls = []

    def load(model, device):
        calls.append(model)
        return encoder

    load.calls = calls
    return load


def test_no_artifact_503_then_ready_after_publish(tmp_path, tiny_encoder, sample_artifacts_dir):
    app = create_app(make_settings(tmp_path), encoder_loader=loader_of(tiny_encoder))
    with TestClient(app) as client:
        assert client.get("/healthz").status_code == 200
        r = client.get("/readyz")
        assert r.status_code == 503
        assert NO_ARTIFACT_HINT in r.json()["detail"]  # names the job to run
        assert str(tmp_path) not in r.text and "<artifacts>/curated" in r.json()["detail"]  # no server paths
        for method, path, kw in [("post", "/search", {"json": SEED}), ("get", "/stats", {}), ("get", "/record/1", {}),
                                 ("post", "/search/image", {"files": {"file": ("a.jpg", b"x")}})]:
            r = getattr(client, method)(path, **kw)
            assert r.status_code in (503, 415) if path == "/search/image" else r.status_code == 503, (path, r.text)
            if r.status_code == 503:
                assert "no curated artifact yet" in r.json()["detail"] and NO_ARTIFACT_HINT in r.json()["detail"]
        # The pipeline publishes; the service picks it up (watcher disabled here: drive one poll).
        v = load_version(sample_artifacts_dir)
        manifest = subset_manifest(v, v.records[:120])
        shutil.copytree(sample_artifacts_dir / "images", tmp_path / "images")
        version = publish_curated_version(tmp_path, v.records[:120], v.image_emb[:120], v.text_emb[:120], manifest).version
        assert app.state.service.check_for_update() is True
        r = client.get("/readyz")
        assert r.status_code == 200 and r.json()["version"] == version
        assert len(client.post("/search", json=SEED).json()) == 5
        assert client.get("/stats").json()["num_records"] == 120


def test_configured_model_differs_from_manifest_refuses_to_start(sample_artifacts_dir):
    app = create_app(
        make_settings(sample_artifacts_dir, clip_model="openai/clip-vit-base-patch32"),
        encoder_loader=loader_of(HashEncoder("openai/clip-vit-base-patch32")),
    )
    with pytest.raises(ModelMismatchError, match="embedded with model 'tiny-random' but CURATION_CLIP_MODEL"):
        with TestClient(app):
            pass


def test_configured_model_equal_to_manifest_starts(sample_artifacts_dir, tiny_encoder):
    load = loader_of(tiny_encoder)
    app = create_app(make_settings(sample_artifacts_dir, clip_model="tiny-random"), encoder_loader=load)
    with TestClient(app) as client:
        assert client.get("/readyz").status_code == 200
    assert load.calls == ["tiny-random"]  # the manifest's model, loaded once


def test_unloadable_model_refuses_to_start(sample_artifacts_dir):
    from curation_dagster.core.encoder import ModelLoadError

    def load(model, device):
        raise ModelLoadError(f"cannot load model {model!r} (injected)")

    app = create_app(make_settings(sample_artifacts_dir), encoder_loader=load)
    with pytest.raises(ModelLoadError, match="cannot load model 'tiny-random'"):
        with TestClient(app):
            pass


def test_unexpected_loader_error_is_reported_not_fatal(sample_artifacts_dir):
    def load(model, device):
        raise OSError(f"disk hiccup while loading {model}")

    app = create_app(make_settings(sample_artifacts_dir), encoder_loader=load)
    with TestClient(app) as client:
        r = client.get("/readyz")
        assert r.status_code == 503 and "disk hiccup while loading tiny-random" in r.json()["detail"]


def test_broken_current_at_startup_is_reported(artifacts_copy, tiny_encoder):
    v = read_current_version_name(artifacts_copy)
    (curated_dir(artifacts_copy) / v / "image_embeddings.npy").unlink()
    app = create_app(make_settings(artifacts_copy), encoder_loader=loader_of(tiny_encoder))
    with TestClient(app) as client:
        r = client.get("/readyz")
        assert r.status_code == 503
        assert v in r.json()["detail"] and "image_embeddings.npy" in r.json()["detail"]
        r = client.post("/search", json=SEED)
        assert r.status_code == 503 and "image_embeddings.npy" in r.json()["detail"]


def _clone_version(artifacts_dir, damage=None, manifest_changes=None) -> str:
    """A copy of the current version under a new name, optionally damaged, then CURRENT pointed at it."""
    cdir = curated_dir(artifacts_dir)
    src = cdir / read_current_version_name(artifacts_dir)
    name = new_version_name("clone")
    shutil.copytree(src, cdir / name)
    if manifest_changes:
        m = json.loads((cdir / name / "manifest.json").read_text())
        m.update(manifest_changes)
        (cdir / name / "manifest.json").write_text(json.dumps(m))
    if damage:
        damage(cdir / name)
    (cdir / CURRENT_FILENAME).write_text(name + "\n")
    return name


def _wrong_dim(vdir):
    for f in ("image_embeddings.npy", "text_embeddings.npy"):
        x = np.load(vdir / f)[:, :16].copy()
        np.save(vdir / f, (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32))
    m = json.loads((vdir / "manifest.json").read_text())
    m["dim"] = 16
    (vdir / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize(
    "damage, manifest_changes, message",
    [
        (lambda d: (d / "text_embeddings.npy").unlink(), None, "missing ['text_embeddings.npy']"),
        (_wrong_dim, None, "embeds to dimension"),
        (None, {"model": "openai/clip-vit-base-patch32"}, "restart the API to switch models"),
        (lambda d: (d / "records.parquet").write_bytes(b"PAR1 broken"), None, "records.parquet"),
    ],
    ids=["missing-file", "wrong-dimension", "different-model", "corrupt-records"],
)
def test_broken_new_version_keeps_old_serving(artifacts_copy, tiny_encoder, damage, manifest_changes, message):
    old = read_current_version_name(artifacts_copy)
    app = create_app(make_settings(artifacts_copy), encoder_loader=loader_of(tiny_encoder))
    with TestClient(app) as client:
        before = client.post("/search", json=SEED).json()
        bad = _clone_version(artifacts_copy, damage, manifest_changes)
        assert app.state.service.check_for_update() is False
        r = client.post("/search", json=SEED)
        assert r.status_code == 200 and r.json() == before and r.headers["x-curated-version"] == old
        ready = client.get("/readyz")
        assert ready.status_code == 200 and ready.json()["version"] == old
        err = ready.json()["reload_error"]
        assert err["version"] == bad and message in err["error"]
        stats = client.get("/stats").json()
        assert stats["version"] == old and stats["reload_error"]["version"] == bad
        for text in (ready.text, client.get("/stats").text):
            assert str(artifacts_copy) not in text and str(artifacts_copy.resolve()) not in text
        # The failed version is not retried on every poll; a good new version clears the error.
        assert app.state.service.check_for_update() is False
        cdir = curated_dir(artifacts_copy)
        good = new_version_name("good")
        shutil.copytree(cdir / old, cdir / good)
        (cdir / CURRENT_FILENAME).write_text(good + "\n")
        assert app.state.service.check_for_update() is True
        ready = client.get("/readyz").json()
        assert ready["version"] == good and ready["reload_error"] is None


def test_hot_reload_under_continuous_requests(artifacts_copy, tiny_encoder):
    """The watcher swaps in a new version while a client hammers /search: zero failures, new version visible."""
    old = read_current_version_name(artifacts_copy)
    app = create_app(make_settings(artifacts_copy, reload_interval_s=0.05), encoder_loader=loader_of(tiny_encoder))
    statuses: list[int] = []
    versions: list[str] = []
    timed: list[tuple[float, float, str]] = []  # (request start, response end, version)
    lock = threading.Lock()
    stop = threading.Event()
    with TestClient(app) as client:

        def hammer():
            i = 0
            while not stop.is_set():
                i += 1
                body = SEED if i % 3 else {"query": "lampe torche étanche camping", "top_k": 10}
                t0 = time.monotonic()
                r = client.post("/search", json=body)
                t1 = time.monotonic()
                with lock:
                    statuses.append(r.status_code)
                    versions.append(r.headers.get("x-curated-version", ""))
                    timed.append((t0, t1, versions[-1]))
                if r.status_code != 200 or len(r.json()) != body["top_k"]:
                    statuses.append(-1)

        threads = [threading.Thread(target=hammer) for _ in range(3)]
        for t in threads:
            t.start()
        time.sleep(0.5)
        # Publish a new version with fewer rows (the pipeline's writer, same model).
        v = load_version(artifacts_copy)
        keep = np.arange(0, v.count, 2)
        manifest = subset_manifest(v, v.records[keep])
        new = publish_curated_version(artifacts_copy, v.records[keep], v.image_emb[keep], v.text_emb[keep], manifest).version
        deadline = time.time() + 30
        while time.time() < deadline and (not versions or versions[-1] != new):
            time.sleep(0.05)
        time.sleep(0.3)
        stop.set()
        for t in threads:
            t.join(30)
        assert client.get("/stats").json()["num_records"] == len(keep)
        assert client.get("/readyz").json()["version"] == new
    assert statuses and all(s == 200 for s in statuses), sorted(set(statuses))
    by_start = sorted(timed)
    assert by_start[0][2] == old and by_start[-1][2] == new
    # Once the new version answered, no request started after that got the old one (the swap is one-way). Requests
    # are ordered by their start: three threads may append their results out of order.
    first_new_end = min(t1 for _, t1, v in timed if v == new)
    assert {v for t0, _, v in timed if t0 > first_new_end} == {new}
    assert len(versions) > 20


def test_startup_heap_leaves_the_cyclic_collector_while_serving(tmp_path, tiny_encoder):
    """The long-lived start-up objects are frozen out of the collector (no full-collection pause walks them under
    load) and handed back at shutdown."""
    import gc

    gc.unfreeze()
    app = create_app(make_settings(tmp_path), encoder_loader=loader_of(tiny_encoder))
    with TestClient(app) as client:
        assert client.get("/healthz").status_code == 200
        frozen = gc.get_freeze_count()
    assert frozen > 1000  # modules, the encoder, the service: everything alive at start-up
    assert gc.get_freeze_count() == 0
