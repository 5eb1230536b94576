"""The watcher and start-up against bad CURRENT files and bad versions (issue 9, items 7 and 8)."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from api_helpers import HashEncoder, build_sample_artifact, make_settings, subset_manifest
from fastapi.testclient import TestClient

from api import service as service_mod
from api.main import create_app
from curation_dagster.core.artifacts import (
    CURRENT_FILENAME,
    curated_dir,
    load_version,
    new_version_name,
    publish_curated_version,
    read_current_version_name,
)

SEED = {"query": "lampe torche", "top_k": 3}


@pytest.fixture(scope="module")
def base_artifacts(tmp_path_factory):
    d = tmp_path_factory.mktemp("robust")
    build_sample_artifact(d, HashEncoder(), rows=80)
    return d


@pytest.fixture
def art(base_artifacts, tmp_path):
    dest = tmp_path / "art"
    shutil.copytree(base_artifacts, dest)
    return dest


def _app(art):
    return create_app(make_settings(art), encoder_loader=lambda m, d: HashEncoder())


def _point_current(art, name: str) -> None:
    (curated_dir(art) / CURRENT_FILENAME).write_text(name + "\n")


# ------------------------------------------------------------------------------------------- (a) empty version


def test_empty_version_is_never_swapped_in(art):
    old = read_current_version_name(art)
    v = load_version(art)
    app = _app(art)
    with TestClient(app) as c:
        empty = v.records[:0]
        name = publish_curated_version(art, empty, v.image_emb[:0], v.text_emb[:0], subset_manifest(v, empty)).version
        assert app.state.service.check_for_update() is False
        assert c.post("/search", json=SEED).headers["x-curated-version"] == old
        err = c.get("/readyz").json()["reload_error"]
        assert err["version"] == name and "empty" in err["error"]


# ------------------------------------------------------------------------------------------- (b) malformed CURRENT at start


def _current_is_dir(art):
    p = curated_dir(art) / CURRENT_FILENAME
    p.unlink()
    p.mkdir()


def _current_not_utf8(art):
    (curated_dir(art) / CURRENT_FILENAME).write_bytes(b"\xff\xfe\x80 not utf-8")


def _current_symlink_loop(art):
    p = curated_dir(art) / CURRENT_FILENAME
    p.unlink()
    loop = curated_dir(art) / "loop"
    os.symlink(p, loop)
    os.symlink(loop, p)


def _artifacts_is_a_file(art):
    shutil.rmtree(art)
    art.write_text("not a directory")


@pytest.mark.parametrize("damage", [_current_is_dir, _current_not_utf8, _current_symlink_loop, _artifacts_is_a_file])
def test_malformed_current_at_startup_answers_503(art, damage):
    damage(art)
    app = _app(art)
    with TestClient(app) as c:  # starts: no crash
        r = c.get("/readyz")
        assert r.status_code == 503
        assert "CURRENT" in r.json()["detail"] or "not a directory" in r.json()["detail"]
        assert r.json()["reload_error"]["error"]
        for method, path in (("post", "/search"), ("get", "/stats"), ("get", "/record/1")):
            r = getattr(c, method)(path, **({"json": SEED} if method == "post" else {}))
            assert r.status_code == 503, (path, r.text)


@pytest.mark.parametrize("exc", [UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"),
                                 OSError(40, "Too many levels of symbolic links"), PermissionError(13, "denied")])
def test_raw_errors_from_reading_current_are_caught(art, monkeypatch, exc):
    """Whatever artifacts.py raises (a clean ArtifactError, or a raw OSError/UnicodeDecodeError)."""
    def boom(_):
        raise exc

    monkeypatch.setattr(service_mod, "read_current_version_name", boom)
    app = _app(art)
    with TestClient(app) as c:
        r = c.get("/readyz")
        assert r.status_code == 503 and type(exc).__name__ in r.json()["detail"]


# ------------------------------------------------------------------------------------------- (c) version appears later


def test_current_naming_a_missing_version_is_retried(art):
    old = read_current_version_name(art)
    app = _app(art)
    with TestClient(app) as c:
        later = new_version_name("later")
        _point_current(art, later)
        assert app.state.service.check_for_update() is False
        assert "does not exist" in c.get("/stats").json()["reload_error"]["error"]
        assert app.state.service.check_for_update() is False  # still missing
        shutil.copytree(curated_dir(art) / old, curated_dir(art) / later)  # the directory appears
        m = json.loads((curated_dir(art) / later / "manifest.json").read_text())
        assert app.state.service.check_for_update() is True, m
        ready = c.get("/readyz").json()
        assert ready["version"] == later and ready["reload_error"] is None


def _start_copying_a_version(art) -> tuple[str, str]:
    """An operator copies the served version in by hand under a new name; CURRENT names it before its files (only
    the manifest so far) are there. Returns (served, new)."""
    old, later = read_current_version_name(art), new_version_name("copied")
    (curated_dir(art) / later).mkdir()
    shutil.copy(curated_dir(art) / old / "manifest.json", curated_dir(art) / later / "manifest.json")
    _point_current(art, later)
    return old, later


def _finish_copying(art, old: str, later: str) -> None:
    for f in (curated_dir(art) / old).iterdir():
        if not (curated_dir(art) / later / f.name).exists():
            shutil.copy(f, curated_dir(art) / later / f.name)


def test_a_version_caught_half_copied_is_loaded_once_the_copy_completes(art):
    """Before, the version was marked failed for good (until a restart) although its files completed a moment
    later."""
    app = _app(art)
    with TestClient(app) as c:
        old, later = _start_copying_a_version(art)
        assert app.state.service.check_for_update() is False
        assert "incomplete" in c.get("/stats").json()["reload_error"]["error"]
        assert app.state.service.check_for_update() is False  # unchanged: not reloaded on every poll
        _finish_copying(art, old, later)
        assert app.state.service.check_for_update() is True
        assert c.get("/readyz").json()["version"] == later


def test_a_copy_completing_during_the_failed_load_is_still_retried(art, monkeypatch):
    """The files' fingerprint is taken before the load: taken after, it already showed the finished copy."""
    app = _app(art)
    with TestClient(app) as c:
        old, later = _start_copying_a_version(art)
        real = service_mod.load_version

        def load_while_the_copy_completes(artifacts_dir, name=None):
            try:
                return real(artifacts_dir, name)
            finally:
                _finish_copying(art, old, later)

        monkeypatch.setattr(service_mod, "load_version", load_while_the_copy_completes)
        assert app.state.service.check_for_update() is False
        assert app.state.service.check_for_update() is True
        assert c.get("/readyz").json()["version"] == later


# ------------------------------------------------------------------------------------------- (d) rollback clears the error


def test_rollback_to_served_version_clears_reload_error(art):
    old = read_current_version_name(art)
    app = _app(art)
    with TestClient(app) as c:
        bad = new_version_name("bad")
        shutil.copytree(curated_dir(art) / old, curated_dir(art) / bad)
        (curated_dir(art) / bad / "text_embeddings.npy").unlink()
        _point_current(art, bad)
        assert app.state.service.check_for_update() is False
        assert c.get("/readyz").json()["reload_error"]["version"] == bad
        _point_current(art, old)  # operator rolls back
        assert app.state.service.check_for_update() is False
        assert c.get("/readyz").json()["reload_error"] is None
        assert c.get("/stats").json()["reload_error"] is None


# ------------------------------------------------------------------------------------------- (e) unreadable CURRENT later


def test_watcher_reports_unreadable_current(art, monkeypatch):
    old = read_current_version_name(art)
    app = _app(art)
    with TestClient(app) as c:
        def denied(_):
            raise PermissionError(13, "Permission denied")

        monkeypatch.setattr(service_mod, "read_current_version_name", denied)
        assert app.state.service.check_for_update() is False
        ready = c.get("/readyz")
        assert ready.status_code == 200 and ready.json()["version"] == old  # keeps serving
        assert "PermissionError" in ready.json()["reload_error"]["error"]
        assert "PermissionError" in c.get("/stats").json()["reload_error"]["error"]
        # what any client sees names the file, not where the deployment keeps it (the log has the full path)
        assert "<artifacts>/curated/CURRENT" in ready.json()["reload_error"]["error"]
        for r in (ready, c.get("/stats")):
            assert str(art) not in r.text and str(art.resolve()) not in r.text
        monkeypatch.undo()
        assert app.state.service.check_for_update() is False
        assert c.get("/readyz").json()["reload_error"] is None  # readable again, same version


def test_current_becoming_a_directory_is_reported(art):
    app = _app(art)
    with TestClient(app) as c:
        _current_is_dir(art)
        assert app.state.service.check_for_update() is False
        assert "CURRENT" in c.get("/stats").json()["reload_error"]["error"]


# ------------------------------------------------------------------------------------------- item 8: probe canary


def test_random_text_embeddings_are_refused(art):
    old = read_current_version_name(art)
    v = load_version(art)
    app = _app(art)
    with TestClient(app) as c:
        before = c.post("/search", json=SEED).json()
        rng = np.random.default_rng(0)
        rand = rng.standard_normal(v.text_emb.shape)
        rand = (rand / np.linalg.norm(rand, axis=1, keepdims=True)).astype(np.float32)
        bad = publish_curated_version(art, v.records, v.image_emb, rand, subset_manifest(v, v.records)).version
        assert app.state.service.check_for_update() is False
        r = c.post("/search", json=SEED)
        assert r.status_code == 200 and r.headers["x-curated-version"] == old and r.json() == before
        err = c.get("/readyz").json()["reload_error"]
        assert err["version"] == bad and "probe" in err["error"]
        # The same vectors with the right text embeddings are accepted.
        good = publish_curated_version(art, v.records, v.image_emb, v.text_emb, subset_manifest(v, v.records)).version
        assert app.state.service.check_for_update() is True
        assert c.get("/readyz").json()["version"] == good


def test_version_without_probe_is_refused(art):
    old = read_current_version_name(art)
    v = load_version(art)
    app = _app(art)
    with TestClient(app) as c:
        manifest = {k: v.manifest[k] for k in ("model", "thresholds", "counts")}
        publish_curated_version(art, v.records, v.image_emb, v.text_emb, manifest)
        assert app.state.service.check_for_update() is False
        assert c.get("/readyz").json()["version"] == old
        assert "probe" in c.get("/readyz").json()["reload_error"]["error"]


@pytest.mark.parametrize("failure", [OSError(24, "Too many open files"), OSError(5, "Input/output error")],
                         ids=["EMFILE", "EIO"])
def test_a_version_that_failed_to_load_for_a_passing_reason_is_loaded_on_the_next_poll(art, monkeypatch, failure):
    """Before the fix every load failure was sticky: a good new version hit by one EMFILE was never retried (until
    its files changed or a restart), and the service stayed on the old version."""
    from curation_dagster.core import artifacts as art_mod

    old = read_current_version_name(art)
    v = load_version(art)
    app = _app(art)
    with TestClient(app) as c:
        new = publish_curated_version(art, v.records[:50], v.image_emb[:50], v.text_emb[:50],
                                      subset_manifest(v, v.records[:50])).version
        real = art_mod.np.load

        def fails(*args, **kwargs):
            raise failure

        monkeypatch.setattr(art_mod.np, "load", fails)  # artifacts wraps it: "cannot read ...: [Errno 24] ..."
        assert app.state.service.check_for_update() is False
        err = c.get("/readyz").json()["reload_error"]
        assert err["version"] == new and "retried on the next poll" in err["error"]
        assert c.post("/search", json=SEED).headers["x-curated-version"] == old  # the old one keeps serving
        monkeypatch.setattr(art_mod.np, "load", real)
        assert app.state.service.check_for_update() is True  # same files, loaded now
        assert c.post("/search", json=SEED).headers["x-curated-version"] == new
        assert c.get("/readyz").json()["reload_error"] is None


def test_a_broken_version_is_still_not_reloaded_on_every_poll(art, monkeypatch):
    v = load_version(art)
    app = _app(art)
    with TestClient(app) as c:
        new = publish_curated_version(art, v.records[:50], v.image_emb[:50], v.text_emb[:50],
                                      subset_manifest(v, v.records[:50])).version
        (curated_dir(art) / new / "records.parquet").write_bytes(b"PAR1 broken")
        loads = []
        real = service_mod.load_version
        monkeypatch.setattr(service_mod, "load_version", lambda *a, **k: loads.append(1) or real(*a, **k))
        assert app.state.service.check_for_update() is False
        assert app.state.service.check_for_update() is False
        assert len(loads) == 1 and "retried" not in c.get("/readyz").json()["reload_error"]["error"]


def test_a_version_whose_array_header_asks_for_terabytes_is_not_reloaded_on_every_poll(art, monkeypatch):
    """numpy raises a MemoryError for it: that is the version's fault, not the machine's (a review caught the first
    retry rule reloading such a version every 2 s)."""
    from curation_dagster.core.artifacts import IMAGE_EMB_FILE

    v = load_version(art)
    app = _app(art)
    with TestClient(app) as c:
        new = publish_curated_version(art, v.records[:50], v.image_emb[:50], v.text_emb[:50],
                                      subset_manifest(v, v.records[:50])).version
        with open(curated_dir(art) / new / IMAGE_EMB_FILE, "wb") as fh:
            np.lib.format.write_array_header_1_0(fh, {"descr": "<f4", "fortran_order": False,
                                                      "shape": (999_999_999_999, 4)})
        loads = []
        real = service_mod.load_version
        monkeypatch.setattr(service_mod, "load_version", lambda *a, **k: loads.append(1) or real(*a, **k))
        for _ in range(3):
            assert app.state.service.check_for_update() is False
        err = c.get("/readyz").json()["reload_error"]
        assert len(loads) == 1 and err["version"] == new and "retried" not in err["error"]
