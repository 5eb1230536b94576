"""Latency of adding a product through the API (POST /records): checks, embedding, durable inbox write, delta index.

A real ``uvicorn api.main:app`` on 127.0.0.1, one client adding distinct products one after another (a shop's
steady trickle), for two models: tiny-random (over the bundled sample embedded with it) and the full-size ViT-B/32
CLIP with random weights (real FLOPs; over a 10k synthetic corpus, see bench_search). Each added product is then
looked up by /record and found by /search/image (the check that "searchable at once" holds). Prints p50/p99 and the
server's split, the CPU model and the load, and a last line ``RESULT {json}``.

Usage: python benchmarks/bench_add.py [--n 30] [--skip-full]
"""
from __future__ import annotations

import argparse
import io
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
from bench_search import make_artifact, pct, save_full_size_clip, start_server, stop_server  # noqa: E402
from bench_soak import build_corpus, publish_subset  # noqa: E402

from curation_dagster.core.system import cpu_model, load_average  # noqa: E402

TOKEN = "bench-add-token"


def product_image(seed: int) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    img = Image.fromarray((rng.random((6, 6, 3)) * 255).astype(np.uint8)).resize((500, 500), Image.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def add_many(base: str, n: int, seed0: int, query: str = "allow_misaligned=true") -> dict:
    import httpx

    lat, errors, found = [], [], 0
    with httpx.Client(base_url=base, timeout=120, headers={"Authorization": f"Bearer {TOKEN}"}) as c:
        for i in range(n):
            img = product_image(seed0 + i)
            t0 = time.perf_counter()
            r = c.post(f"/records?{query}", files={"image": ("p.jpg", img, "image/jpeg")},
                       data={"designation": f"Produit de test numéro {seed0 + i}, lampe de bureau"})
            dt = time.perf_counter() - t0
            if r.status_code != 201:
                errors.append(f"{r.status_code} {r.text[:120]}")
                continue
            lat.append(dt)
            rid = r.json()["record_id"]
            ok = c.get(f"/record/{rid}").status_code == 200
            hit = c.post("/search/image", files={"file": ("q.jpg", img, "image/jpeg")}, data={"top_k": "1"}).json()
            found += int(ok and hit and hit[0]["record_id"] == rid)
    return {"added": len(lat), "errors": len(errors), "error_samples": errors[:3], "searchable_at_once": found,
            "p50_ms": round(pct(lat, 50) * 1e3, 1) if lat else None, "p99_ms": round(pct(lat, 99) * 1e3, 1) if lat else None,
            "mean_ms": round(statistics.mean(lat) * 1e3, 1) if lat else None}


def run(label: str, artifacts: Path, n: int, seed0: int, query: str = "allow_misaligned=true") -> dict:
    proc, base, ready_s = start_server(artifacts, {"CURATION_API_WRITE_TOKEN": TOKEN, "CURATION_PRECISION": "fp32"},
                                       artifacts.parent / "uvicorn.log")
    try:
        add_many(base, 3, seed0 + 10_000, query)  # warm-up (first forward, first fsync of the inbox directories)
        r = add_many(base, n, seed0, query)
    finally:
        stop_server(proc)
    r.update(model=label, ready_s=round(ready_s, 1), load=load_average())
    print(f"[{label}] {r['added']} added, {r['errors']} errors, p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms, "
          f"searchable at once: {r['searchable_at_once']}/{r['added']} ({r['load']}) {r['error_samples'][:1]}", flush=True)
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=30)
    ap.add_argument("--skip-full", action="store_true", help="tiny-random only")
    args = ap.parse_args()
    print(f"CPU: {cpu_model()}; {load_average()}; one client, distinct products, fsync'd inbox on local disk",
          flush=True)
    results = []
    tmp = Path(tempfile.mkdtemp(prefix="bench-add-"))
    try:
        tiny = tmp / "tiny" / "artifacts"
        corpus = build_corpus(tiny)
        publish_subset(tiny, corpus, np.ones(corpus[0].height, bool))
        results.append(run("tiny-random", tiny, args.n, 0))
        if not args.skip_full:
            from curation_dagster.core.settings import model_cache_dir

            model_dir = save_full_size_clip(model_cache_dir() / "bench-clip-vit-b32-random")
            full = tmp / "full" / "artifacts"
            make_artifact(full, str(model_dir), 10_000)
            # Random weights map every image close to one direction: the duplicate check (which still runs, at full
            # cost) would refuse them all, so the run forces them in.
            results.append(run("ViT-B/32 (random weights)", full, args.n, 1000,
                               "allow_misaligned=true&allow_duplicate=true"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print("RESULT " + json.dumps({"cpu_model": cpu_model(), "runs": results}))


if __name__ == "__main__":
    main()
