"""API settings: the shared pipeline variables (curation_dagster.core.settings) plus API-only knobs.

| variable | meaning | default |
|---|---|---|
| `CURATION_ARTIFACTS_DIR`, `CURATION_DEVICE`, `CURATION_PRECISION` | as for the pipeline | see README "Configuration" |
| `CURATION_CLIP_MODEL` | when set, the model the API must serve; it refuses to start if the artifact was built with another | unset: the artifact's model |
| `CURATION_API_RELOAD_INTERVAL_S` | how often the watcher polls `curated/CURRENT` (0 disables hot reload; at most 86400) | 2.0 |
| `CURATION_API_MAX_UPLOAD_BYTES` | size limit of an image query upload (413 above) | 10485760 (10 MiB) |
| `CURATION_API_MAX_UPLOAD_PIXELS` | most pixels (width x height, read from the header before decoding; for JPEG after reduced-size decoding) an uploaded image may decode to (413 above) | 16000000 (16 Mpx) |
| `CURATION_API_MAX_CONCURRENT_DECODES` | uploaded images decoded at once (others wait; bounds decode memory) | 2 |
| `CURATION_API_MAX_BODY_BYTES` | size limit of any other request body, e.g. the JSON of `/search` (413 above) | 65536 (64 KiB) |
| `CURATION_API_EXACT_MAX` | largest corpus (or category) searched exactly with `IndexFlatIP`; approximate above | 20000 |
| `CURATION_API_ANN` | the approximate index: `ivf` (builds ~8x faster: startup, hot reload) or `hnsw` | ivf |
| `CURATION_API_HNSW_M`, `CURATION_API_HNSW_EF_SEARCH`, `CURATION_API_HNSW_EF_CONSTRUCTION` | HNSW parameters | 32, 128, 80 |
| `CURATION_API_IVF_NPROBE` | IVF lists probed per query (nlist = 4·sqrt(n)) | 32 |
| `CURATION_API_MAX_BATCH` | most queries encoded together by the text micro-batcher (1 disables batching; int8 always 1) | 32 |
| `CURATION_API_MAX_PENDING_QUERIES` | text queries waiting for the encoder past which `POST /search` answers 503 (`Retry-After: 1`) at once instead of queueing (load shedding); 0: unbounded | 256 |
| `CURATION_API_QUERY_TIMEOUT_S` | a query whose vector is not ready by then answers 503 (overloaded) instead of hanging | 30 |
| `CURATION_API_TORCH_THREADS` | threads per text forward (torch intra-op; ONNX Runtime `intra_op_num_threads`) | cores/2, within 1–4 |
| `CURATION_API_ENCODE_WORKERS` | text forwards running at once (workers x torch threads ~ cores) | cores / torch threads |
| `CURATION_API_TEXT_INT8` | int8 text tower for queries on CPU, chosen by fidelity, never by timing. ONNX backend: unless `off`, calibrated (static) int8, micro-batched, else dynamic int8, one query per run, whichever first stays within cosine 0.99 of torch fp32 on the probe (else fp32 ORT). torch backend: dynamic int8 unless `off`, when within cosine 0.995 of fp32 | auto |
| `CURATION_API_TEXT_BACKEND` | query text tower: `auto` (ONNX Runtime when onnxruntime imports and the start-up export + fidelity probe pass, else torch), `onnx` (same, warns on fallback), `torch` | auto |
| `CURATION_API_QUERY_CACHE_SIZE` | query embeddings kept in an LRU cache keyed by (served version, normalised text); 0 disables it | 1024 |
| `CURATION_API_FAISS_THREADS`, `CURATION_API_FAISS_BUILD_THREADS` | faiss OpenMP threads per query / for index builds | 1, cores |
| `CURATION_API_PUBLIC_URL` | base of absolute `image_url`s, an http(s) URL, e.g. `https://search.example.org` (never taken from the request's Host header) | unset: relative `image_url`s (`/images/{file}`) |
| `CURATION_API_WRITE_TOKEN` | secret bearer token that enables `POST /records`, `POST /records/batch`, `DELETE /records/{id}` (403 without it) | unset: writes disabled |
| `CURATION_API_MAX_BATCH_ADD` | most products one `POST /records/batch` may add | 20 |
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from curation_dagster.core import settings as core_settings
from curation_dagster.core.system import available_cpus


def _env_float(name: str, default: float, minimum: float = 0.0, maximum: float = math.inf) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name} must be a number, got {raw!r}") from None
    if not math.isfinite(value) or value < minimum:
        raise ValueError(f"{name} must be a finite number >= {minimum}, got {raw!r}")
    if value > maximum:
        raise ValueError(f"{name} must be at most {maximum:g}, got {raw!r}")
    return value


def _public_url(name: str) -> str | None:
    """An absolute http(s) base URL (image_url = base + /images/...): anything else would be served to browsers as a
    broken or hostile link (a value without a scheme is relative; javascript: runs)."""
    from urllib.parse import urlsplit

    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    parts = urlsplit(raw)
    if parts.scheme.lower() not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
        raise ValueError(f"{name} must be an absolute http(s) URL without query or fragment, such as "
                         f"https://search.example.org; got {raw!r}")
    return raw.rstrip("/")


def _env_int(name: str, default: int, minimum: int = 1) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from None
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _env_choice(name: str, choices: tuple[str, ...], default: str) -> str:
    value = os.environ.get(name, "").strip().lower() or default
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")
    return value


@dataclass(frozen=True)
class IndexConfig:
    exact_max: int = 20_000
    ann: str = "ivf"  # approximate index above exact_max: "ivf" (fast to build) or "hnsw"
    hnsw_m: int = 32
    hnsw_ef_search: int = 128
    hnsw_ef_construction: int = 80
    ivf_nprobe: int = 32
    search_threads: int = 1  # per query: requests already run in parallel in the threadpool
    build_threads: int = 0  # 0: every core

    def __post_init__(self) -> None:
        if self.ann not in ("hnsw", "ivf"):
            raise ValueError(f"CURATION_API_ANN must be 'hnsw' or 'ivf', got {self.ann!r}")


@dataclass(frozen=True)
class ApiSettings:
    artifacts_dir: Path
    clip_model: str | None = None  # None: serve whatever model the artifact names
    device: str = "auto"
    precision: str = "auto"  # CURATION_PRECISION, as for the pipeline
    reload_interval_s: float = 2.0
    max_upload_bytes: int = 10 * 1024 * 1024
    max_upload_pixels: int = 16_000_000
    max_concurrent_decodes: int = 2
    max_body_bytes: int = 64 * 1024
    index: IndexConfig = field(default_factory=IndexConfig)
    max_batch: int = 32
    max_pending_queries: int = 256  # queued text queries past which /search answers 503 at once (0: unbounded)
    query_timeout_s: float = 30.0  # a query not encoded by then gets 503 (overloaded), not a hung request
    torch_threads: int = 1
    encode_workers: int = 1  # text forwards running at once (each with torch_threads threads)
    text_int8: str = "auto"  # int8 text tower for queries on CPU: auto / on (when faithful), off
    # Query text tower backend: auto | onnx | torch (api/onnx_text.py). from_env's default is auto; the field default
    # keeps hand-built settings (tests) on the exact torch path.
    text_backend: str = "torch"
    query_cache_size: int = 0  # LRU query-embedding cache entries (0: off); from_env's default is 1024
    public_url: str | None = None
    write_token: str | None = field(default=None, repr=False)  # CURATION_API_WRITE_TOKEN: enables POST/DELETE /records
    max_batch_add: int = 20  # most products one POST /records/batch may add

    def __post_init__(self) -> None:
        # HTTP carries the header as bytes any client encodes its own way (latin-1, UTF-8): a token outside
        # visible ASCII could never be matched reliably, so it is refused at start, not with 401s later.
        if self.write_token is not None and not re.fullmatch(r"[\x21-\x7e]+", self.write_token):
            raise ValueError("CURATION_API_WRITE_TOKEN must be visible ASCII characters without spaces (an HTTP "
                             "bearer token); generate one with: python -c 'import secrets; "
                             "print(secrets.token_urlsafe(32))'")

    @classmethod
    def from_env(cls) -> "ApiSettings":
        explicit_model = os.environ.get("CURATION_CLIP_MODEL", "").strip() or None
        public = _public_url("CURATION_API_PUBLIC_URL")
        torch_threads = _env_int("CURATION_API_TORCH_THREADS", max(1, min(4, available_cpus() // 2)))
        return cls(
            artifacts_dir=core_settings.artifacts_dir(),
            clip_model=explicit_model,
            device=core_settings.device(),
            precision=core_settings.precision(),
            reload_interval_s=_env_float("CURATION_API_RELOAD_INTERVAL_S", 2.0, maximum=86_400),
            max_upload_bytes=_env_int("CURATION_API_MAX_UPLOAD_BYTES", 10 * 1024 * 1024),
            max_upload_pixels=_env_int("CURATION_API_MAX_UPLOAD_PIXELS", 16_000_000),
            max_concurrent_decodes=_env_int("CURATION_API_MAX_CONCURRENT_DECODES", 2),
            max_body_bytes=_env_int("CURATION_API_MAX_BODY_BYTES", 64 * 1024),
            index=IndexConfig(
                exact_max=_env_int("CURATION_API_EXACT_MAX", 20_000, minimum=0),
                ann=_env_choice("CURATION_API_ANN", ("ivf", "hnsw"), "ivf"),
                hnsw_m=_env_int("CURATION_API_HNSW_M", 32, minimum=4),
                hnsw_ef_search=_env_int("CURATION_API_HNSW_EF_SEARCH", 128),
                hnsw_ef_construction=_env_int("CURATION_API_HNSW_EF_CONSTRUCTION", 80),
                ivf_nprobe=_env_int("CURATION_API_IVF_NPROBE", 32),
                search_threads=_env_int("CURATION_API_FAISS_THREADS", 1),
                build_threads=_env_int("CURATION_API_FAISS_BUILD_THREADS", available_cpus()),
            ),
            max_batch=_env_int("CURATION_API_MAX_BATCH", 32),
            max_pending_queries=_env_int("CURATION_API_MAX_PENDING_QUERIES", 256, minimum=0),
            query_timeout_s=_env_float("CURATION_API_QUERY_TIMEOUT_S", 30.0, minimum=0.001),
            torch_threads=torch_threads,
            encode_workers=_env_int("CURATION_API_ENCODE_WORKERS", max(1, available_cpus() // torch_threads)),
            text_int8=_env_choice("CURATION_API_TEXT_INT8", ("auto", "on", "off"), "auto"),
            text_backend=_env_choice("CURATION_API_TEXT_BACKEND", ("auto", "onnx", "torch"), "auto"),
            query_cache_size=_env_int("CURATION_API_QUERY_CACHE_SIZE", 1024, minimum=0),
            public_url=public,
            write_token=os.environ.get("CURATION_API_WRITE_TOKEN", "").strip() or None,
            max_batch_add=_env_int("CURATION_API_MAX_BATCH_ADD", 20),
        )
