"""A real ``uvicorn api.main:app`` process on a free 127.0.0.1 port, spoken to over HTTP.

It exercises what TestClient does not: the module-level ``app`` built from environment variables, the real
encoder loader (tiny-random through ``from_pretrained``), and raw request paths that no client normalises.
"""
from __future__ import annotations

import http.client
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from api_helpers import free_port, running_uvicorn
from curation_dagster.core.artifacts import images_dir, load_version
from curation_dagster.core.settings import REPO_ROOT

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def server(sample_artifacts_dir, tmp_path_factory):
    env = {"CURATION_CLIP_MODEL": "tiny-random", "CURATION_DEVICE": "cpu", "CURATION_API_RELOAD_INTERVAL_S": "0.5",
           "CURATION_API_MAX_UPLOAD_BYTES": "100000", "CURATION_API_TORCH_THREADS": "1"}
    log = tmp_path_factory.mktemp("uvicorn") / "log.txt"
    with running_uvicorn(sample_artifacts_dir, env, log) as (_, base):
        yield base, int(base.rsplit(":", 1)[1])


def test_seed_queries_over_http(server, sample_artifacts_dir):
    base, _ = server
    version = load_version(sample_artifacts_dir)
    for query in ("armoire chambre enfants", "lampe torche étanche camping"):
        r = httpx.post(f"{base}/search", json={"query": query, "top_k": 5}, timeout=30)
        assert r.status_code == 200, r.text
        hits = r.json()
        assert len(hits) == 5 and r.headers["x-curated-version"] == version.version
        assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
        url = hits[0]["image_url"]
        assert url.startswith("/images/")  # relative (no CURATION_API_PUBLIC_URL)
        img = httpx.get(base + url, timeout=10)
        assert img.status_code == 200
        assert img.content == (images_dir(sample_artifacts_dir) / url.rsplit("/", 1)[1]).read_bytes()
    ready = httpx.get(f"{base}/readyz").json()
    assert ready["model"] == "tiny-random" and ready["meaningless"] is True


def test_concurrent_requests_over_http(server):
    base, _ = server
    queries = [f"produit numéro {i} pour la maison" for i in range(24)]
    with httpx.Client(timeout=60) as c, ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda q: c.post(f"{base}/search", json={"query": q, "top_k": 3}), queries))
    assert all(r.status_code == 200 and len(r.json()) == 3 for r in results)
    # Batched or not, every answer is the one the same query gets alone.
    alone = httpx.post(f"{base}/search", json={"query": queries[5], "top_k": 3}).json()
    assert [h["record_id"] for h in results[5].json()] == [h["record_id"] for h in alone]


def test_upload_limits_over_http(server):
    base, _ = server
    r = httpx.post(f"{base}/search/image", files={"file": ("big.jpg", b"0" * 300_000, "image/jpeg")})
    assert r.status_code == 413
    r = httpx.post(f"{base}/search/image", files={"file": ("a.txt", b"plain text", "text/plain")})
    assert r.status_code == 415


@pytest.mark.parametrize(
    "path",
    [
        "/images/../../../../etc/passwd",
        "/images/..%2f..%2f..%2f..%2fetc%2fpasswd",
        "/images/%2e%2e%2f%2e%2e%2f%2e%2e%2fetc%2fpasswd",
        "/images/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
        "/images/..\\..\\..\\etc\\passwd",
        "/images//etc/passwd",
        "/images/%2Fetc%2Fpasswd",
        "/images/../api/main.py",
        "/images/..%2fcurated%2fCURRENT",
    ],
)
def test_raw_traversal_paths_404(server, path):
    """Sent verbatim (http.client does not normalise dot segments or decode escapes)."""
    _, port = server
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        body = resp.read()
    finally:
        conn.close()
    assert resp.status == 404, (path, resp.status, body[:200])
    assert b"root:" not in body and b"create_app" not in body


def test_uvicorn_refuses_to_start_on_model_mismatch(sample_artifacts_dir):
    """CURATION_CLIP_MODEL names another model than the artifact's: the process exits with a clear message."""
    env = dict(os.environ, CURATION_ARTIFACTS_DIR=str(sample_artifacts_dir), CURATION_CLIP_MODEL="openai/clip-vit-base-patch32",
               CURATION_API_RELOAD_INTERVAL_S="0")
    proc = subprocess.run(
        [sys.executable, "-m", "uvicorn", "api.main:app", "--host", "127.0.0.1", "--port", str(free_port())],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=180,
    )
    assert proc.returncode != 0
    assert "embedded with model 'tiny-random' but CURATION_CLIP_MODEL='openai/clip-vit-base-patch32'" in proc.stderr
