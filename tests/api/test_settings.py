"""API settings from environment variables: defaults, parsing, and clear errors for bad values."""
from __future__ import annotations

import pytest

from api.settings import ApiSettings

API_VARS = ["CURATION_CLIP_MODEL", "CURATION_API_RELOAD_INTERVAL_S", "CURATION_API_MAX_UPLOAD_BYTES", "CURATION_API_EXACT_MAX",
            "CURATION_API_ANN", "CURATION_API_TEXT_INT8", "CURATION_API_TORCH_THREADS", "CURATION_API_ENCODE_WORKERS",
            "CURATION_API_PUBLIC_URL", "CURATION_API_FAISS_THREADS"]


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    for v in API_VARS:
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setenv("CURATION_ARTIFACTS_DIR", str(tmp_path))
    return monkeypatch


def test_defaults(clean_env, tmp_path):
    s = ApiSettings.from_env()
    assert s.artifacts_dir == tmp_path
    assert s.clip_model is None  # not set explicitly: serve the artifact's model
    assert s.reload_interval_s == 2.0 and s.max_upload_bytes == 10 * 1024 * 1024
    assert s.index.exact_max == 20_000 and s.index.ann == "ivf" and s.index.search_threads == 1
    assert s.text_int8 == "auto" and s.torch_threads >= 1 and s.encode_workers >= 1


def test_overrides(clean_env):
    clean_env.setenv("CURATION_CLIP_MODEL", " tiny-random ")
    clean_env.setenv("CURATION_API_RELOAD_INTERVAL_S", "0")
    clean_env.setenv("CURATION_API_MAX_UPLOAD_BYTES", "1234")
    clean_env.setenv("CURATION_API_ANN", "HNSW")
    clean_env.setenv("CURATION_API_TORCH_THREADS", "2")
    clean_env.setenv("CURATION_API_PUBLIC_URL", "https://search.example.org/")
    s = ApiSettings.from_env()
    assert s.clip_model == "tiny-random" and s.reload_interval_s == 0 and s.max_upload_bytes == 1234
    assert s.index.ann == "hnsw" and s.torch_threads == 2 and s.public_url == "https://search.example.org"


@pytest.mark.parametrize(
    "var, value, message",
    [
        ("CURATION_API_MAX_UPLOAD_BYTES", "ten", "must be an integer"),
        ("CURATION_API_MAX_UPLOAD_BYTES", "0", "must be >= 1"),
        ("CURATION_API_RELOAD_INTERVAL_S", "-1", "must be a finite number >= 0"),
        ("CURATION_API_RELOAD_INTERVAL_S", "nan", "must be a finite number >= 0"),
        ("CURATION_API_QUERY_TIMEOUT_S", "inf", "must be a finite number >= 0.001"),
        ("CURATION_API_QUERY_TIMEOUT_S", "0", "must be a finite number >= 0.001"),
        ("CURATION_API_MAX_PENDING_QUERIES", "-1", "must be >= 0"),
        ("CURATION_API_ANN", "lsh", "must be one of ivf, hnsw"),
        ("CURATION_API_TEXT_INT8", "maybe", "must be one of auto, on, off"),
        ("CURATION_API_RELOAD_INTERVAL_S", "1e300", "must be at most 86400"),  # the watcher thread died
        ("CURATION_API_PUBLIC_URL", "javascript:alert", "must be an absolute http"),
        ("CURATION_API_PUBLIC_URL", "search.example.org", "must be an absolute http"),  # relative image_urls
        ("CURATION_API_PUBLIC_URL", "https://x.org/?a=1", "must be an absolute http"),
    ],
)
def test_bad_values_name_the_variable(clean_env, var, value, message):
    clean_env.setenv(var, value)
    with pytest.raises(ValueError, match=f"{var} {message}"):
        ApiSettings.from_env()
