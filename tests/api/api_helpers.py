"""Helpers for the API tests (importable as ``api_helpers``; fixtures live in conftest.py)."""
from __future__ import annotations

import contextlib
import hashlib
import re
import shutil
from pathlib import Path

import numpy as np
import polars as pl

from api.settings import ApiSettings, IndexConfig
from curation_dagster.core.artifacts import build_probe, image_file_name, images_dir, publish_curated_version
from curation_dagster.core.settings import REPO_ROOT

SAMPLE_DIR = REPO_ROOT / "data" / "sample"


def build_sample_artifact(artifacts_dir: Path, encoder, *, rows: int | None = None, run_id: str = "sample") -> str:
    """Sample rows → images copied to images/ → embeddings from ``encoder`` → a published curated version."""
    from curation_dagster.core.rakuten import read_source
    from curation_dagster.core.text import clean_text

    products = read_source(SAMPLE_DIR).products
    if rows is not None:
        products = products.head(rows)
    img_dir = images_dir(artifacts_dir)
    img_dir.mkdir(parents=True, exist_ok=True)
    files = []
    for iid, pid, src in products.select("imageid", "productid", "source_image_path").iter_rows():
        name = image_file_name(iid, pid)
        if not (img_dir / name).exists():
            shutil.copyfile(src, img_dir / name)
        files.append(name)
    designations = [clean_text(d) for d in products["designation"].to_list()]
    image_emb = encoder.encode_images([str(img_dir / f) for f in files])
    text_emb = encoder.encode_texts(designations)
    align = np.einsum("ij,ij->i", image_emb, text_emb).astype(np.float32)
    records = pl.DataFrame(
        {
            "record_id": products["record_id"],
            "productid": products["productid"],
            "imageid": products["imageid"],
            "designation": designations,
            "description": [clean_text(d) or None for d in products["description"].to_list()],
            "prdtypecode": products["prdtypecode"],
            "category": products["category"],
            "image_file": files,
            "alignment_score": align,
            "dup_group": products["record_id"],
        }
    )
    n = records.height
    manifest = {
        "model": encoder.model_name,
        "meaningless": bool(getattr(encoder, "meaningless", False)),
        "thresholds": {"alignment_min_score": None, "dedup_image": 0.95},
        "counts": {"raw": n, "sampled": n, "clean": n, "removed_misaligned": 0, "removed_duplicate": 0, "curated": n},
        "probe": build_probe(designations),  # the exact strings embedded as text_emb, for the service's canary
    }
    return publish_curated_version(artifacts_dir, records, image_emb, text_emb, manifest, run_id=run_id).version


def subset_manifest(version, records: pl.DataFrame) -> dict:
    """Manifest for republishing some rows of a version built by build_sample_artifact (text = designation),
    with a probe whose row indices point into the new rows."""
    manifest = {k: version.manifest[k] for k in ("model", "thresholds", "counts")}
    manifest["probe"] = build_probe(records["designation"].to_list())
    return manifest


def make_settings(artifacts_dir: Path, **overrides) -> ApiSettings:
    base = dict(
        artifacts_dir=artifacts_dir,
        clip_model=None,
        device="cpu",
        reload_interval_s=0,  # tests drive reloads explicitly unless they test the watcher
        max_upload_bytes=200_000,
        index=IndexConfig(build_threads=1),
        max_batch=32,
        torch_threads=2,
        text_int8="off",  # exact fp32 queries: tests compare rankings with the encoder's own embeddings
    )
    base.update(overrides)
    return ApiSettings(**base)


class HashEncoder:
    """Deterministic stand-in encoder (bag of hashed words / pixel projection) for tests about model handling."""

    meaningless = True
    device = "cpu"

    def __init__(self, model_name: str = "hash-encoder", dim: int = 64):
        self.model_name = model_name
        self.model_identity = model_name
        self.dim = dim
        self.loads = 0

    def _word(self, w: str) -> np.ndarray:
        seed = int.from_bytes(hashlib.sha256(w.encode()).digest()[:8], "little")
        return np.random.default_rng(seed).standard_normal(self.dim)

    def encode_texts(self, texts, batch_size: int = 256, progress=None) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), np.float64)
        for i, t in enumerate(texts):
            for w in re.findall(r"\w+", t.lower()) or [""]:
                out[i] += self._word(w)
        out /= np.linalg.norm(out, axis=1, keepdims=True)
        return out.astype(np.float32)

    def encode_pil(self, images) -> np.ndarray:
        proj = np.random.default_rng(0).standard_normal((16 * 16 * 3, self.dim))
        x = np.stack([np.asarray(im.convert("RGB").resize((16, 16)), np.float64).ravel() / 255 - 0.5 for im in images])
        v = x @ proj
        return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)

    def encode_images(self, paths, batch_size: int = 64, num_workers=None, progress=None) -> np.ndarray:
        from PIL import Image

        return self.encode_pil([Image.open(p) for p in paths])


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_uvicorn(artifacts_dir: Path, env: dict[str, str], log: Path, *, unset: tuple[str, ...] = (),
                    timeout: float = 180):
    """A real ``uvicorn api.main:app`` on a free 127.0.0.1 port, ready (/readyz 200) before it yields
    ``(process, base_url)``; stopped (terminate, then kill) afterwards. ``unset`` drops variables from the
    inherited environment, so their defaults are what runs."""
    import os
    import subprocess
    import sys
    import time

    import httpx
    import pytest

    port = free_port()
    full_env = {**os.environ, "CURATION_ARTIFACTS_DIR": str(artifacts_dir), **env}
    for var in unset:
        full_env.pop(var, None)
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "api.main:app", "--host", "127.0.0.1", "--port",
                                 str(port), "--log-level", "warning"], cwd=REPO_ROOT, env=full_env, stdout=out,
                                stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + timeout
        while True:
            if proc.poll() is not None:
                pytest.fail(f"uvicorn exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.time() > deadline:
                pytest.fail(f"uvicorn not ready after {timeout:.0f} s:\n{log.read_text()[-3000:]}")
            time.sleep(0.3)
        yield proc, base
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
