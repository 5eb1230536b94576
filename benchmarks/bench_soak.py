"""Soak: a real uvicorn under mixed load while new versions are published and broken ones are dropped in.

16 clients (default) for 60 s against 127.0.0.1 only, a mix of POST /search (70 %), POST /search/image (15 %,
a real sample JPEG) and GET /record/{id} (15 %, ids present in every version), while a publisher thread:
- publishes 3 new good versions (subsets of the sample corpus, the pipeline's own writer),
- drops in 2 broken ones: a version whose image embeddings file is truncated (CURRENT pointed at it by hand, as
  a broken writer would), and a well-formed version whose text vectors are random unit vectors (caught only by
  the probe canary).
Every response must be 200 (0 errors): a broken version must be refused while the old one keeps serving, and a
swap must not fail a request in flight. Prints requests, errors, p50/p99 per route, the versions that answered,
the server's RSS at start and end, and a last line ``RESULT {json}``.

The model is tiny-random (built locally): this measures behaviour under load, not model speed (see bench_search).
Usage: python benchmarks/bench_soak.py [--clients 16] [--duration 60]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from curation_dagster.core.system import cpu_model  # noqa: E402
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_search import WORDS, pct, start_server, stop_server  # noqa: E402


def build_corpus(artifacts: Path):
    """The bundled sample embedded with tiny-random: records, embeddings and the image files the API serves."""
    import polars as pl

    from curation_dagster.core.artifacts import build_probe, image_file_name, images_dir
    from curation_dagster.core.encoder import ClipEncoder
    from curation_dagster.core.rakuten import read_source
    from curation_dagster.core.text import clean_text

    products = read_source(REPO / "data" / "sample").products
    img_dir = images_dir(artifacts)
    img_dir.mkdir(parents=True, exist_ok=True)
    files = []
    for iid, pid, src in products.select("imageid", "productid", "source_image_path").iter_rows():
        files.append(image_file_name(iid, pid))
        shutil.copyfile(src, img_dir / files[-1])
    enc = ClipEncoder.load("tiny-random", "cpu", precision="fp32")
    designations = [clean_text(d) for d in products["designation"].to_list()]
    image_emb = enc.encode_images([str(img_dir / f) for f in files])
    text_emb = enc.encode_texts(designations)
    records = pl.DataFrame({
        "record_id": products["record_id"], "productid": products["productid"], "imageid": products["imageid"],
        "designation": designations, "description": [None] * products.height,
        "prdtypecode": products["prdtypecode"], "category": products["category"], "image_file": files,
        "alignment_score": np.einsum("ij,ij->i", image_emb, text_emb).astype(np.float32),
        "dup_group": products["record_id"],
    }, schema_overrides={"description": pl.String})
    return records, image_emb, text_emb, build_probe


def publish_subset(artifacts: Path, corpus, keep: np.ndarray, *, random_text: bool = False) -> str:
    from curation_dagster.core.artifacts import publish_curated_version

    records, img, txt, build_probe = corpus
    recs, img, txt = records.filter(keep), img[keep], txt[keep].copy()
    if random_text:
        noise = np.random.default_rng(int(time.time())).standard_normal(txt.shape).astype(np.float32)
        txt = noise / np.linalg.norm(noise, axis=1, keepdims=True)
    manifest = {"model": "tiny-random", "counts": {"curated": recs.height},
                "probe": build_probe(recs["designation"].to_list())}
    return publish_curated_version(artifacts, recs, img, txt, manifest, keep_versions=10).version


def drop_truncated_version(artifacts: Path) -> str:
    """A copy of the current version with a truncated embeddings file, and CURRENT moved onto it by hand."""
    from curation_dagster.core import artifacts as art

    cdir = art.curated_dir(artifacts)
    src = cdir / art.read_current_version_name(artifacts)
    name = art.new_version_name("broken")
    shutil.copytree(src, cdir / name)
    path = cdir / name / art.IMAGE_EMB_FILE
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    art._write_current(cdir, name)
    return name


def soak(clients: int, duration: float, out: Path | None) -> dict:
    import httpx
    import psutil

    tmp = Path(tempfile.mkdtemp(prefix="bench-soak-"))
    try:
        artifacts = tmp / "artifacts"
        t = time.perf_counter()
        corpus = build_corpus(artifacts)
        n = corpus[0].height
        rng = np.random.default_rng(0)
        always = np.ones(n, bool)
        # Record ids in every version: the first 400 rows are never dropped from a subset.
        stable_ids = corpus[0]["record_id"][:400].to_list()
        first = publish_subset(artifacts, corpus, always)
        print(f"corpus: {n} sample products embedded with tiny-random, version {first} "
              f"({time.perf_counter() - t:.1f} s)")
        env = {"CURATION_API_RELOAD_INTERVAL_S": "0.5", "CURATION_PRECISION": "fp32"}
        proc, base, ready_s = start_server(artifacts, env, tmp / "uvicorn.log")
        server = psutil.Process(proc.pid)
        rss0 = server.memory_info().rss
        image_bytes = [p.read_bytes() for p in sorted((REPO / "data/sample/images/image_train").glob("*.jpg"))[:20]]

        lat: dict[str, list[float]] = defaultdict(list)
        errors: list[str] = []
        versions: Counter = Counter()
        lock = threading.Lock()
        stop = threading.Event()
        events: list[str] = []

        def client(seed: int) -> None:
            r_ = random.Random(seed)
            with httpx.Client(base_url=base, timeout=60) as c:
                while not stop.is_set():
                    roll = r_.random()
                    t0 = time.perf_counter()
                    try:
                        if roll < 0.70:
                            route = "search"
                            resp = c.post("/search", json={"query": " ".join(r_.sample(WORDS, 3)), "top_k": 10})
                        elif roll < 0.85:
                            route = "search_image"
                            resp = c.post("/search/image", files={"file": ("q.jpg", r_.choice(image_bytes),
                                                                           "image/jpeg")}, data={"top_k": "5"})
                        else:
                            route = "record"
                            resp = c.get(f"/record/{r_.choice(stable_ids)}")
                        ok, what = resp.status_code == 200, f"{route} {resp.status_code} {resp.text[:120]}"
                        version = resp.headers.get("x-curated-version")
                    except httpx.HTTPError as exc:
                        ok, what, version = False, f"{route} {type(exc).__name__}: {exc}", None
                    dt = time.perf_counter() - t0
                    with lock:
                        if ok:
                            lat[route].append(dt)
                            versions[version] += 1
                        else:
                            errors.append(what)

        def publisher() -> None:
            plan = [(0.15, "good"), (0.25, "truncated"), (0.40, "good"), (0.55, "random_text"), (0.70, "good")]
            t_start = time.monotonic()
            for at, kind in plan:
                while time.monotonic() - t_start < at * duration:
                    if stop.wait(0.1):
                        return
                keep = always.copy()
                keep[400:] = rng.random(n - 400) > 0.3
                if kind == "good":
                    name = publish_subset(artifacts, corpus, keep)
                elif kind == "random_text":
                    name = publish_subset(artifacts, corpus, keep, random_text=True)
                else:
                    name = drop_truncated_version(artifacts)
                with lock:
                    events.append(f"t={time.monotonic() - t_start:5.1f}s {kind:11s} {name}")

        threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
        pub = threading.Thread(target=publisher)
        t0 = time.perf_counter()
        for th in [*threads, pub]:
            th.start()
        peak = rss0
        refused: dict[str, str] = {}  # versions the service refused to swap in, with its reason
        with httpx.Client(base_url=base, timeout=30) as monitor:
            while time.perf_counter() - t0 < duration:
                time.sleep(0.5)
                peak = max(peak, server.memory_info().rss)
                err = monitor.get("/readyz").json().get("reload_error")
                if err:
                    refused.setdefault(err["version"], err["error"][:160])
        stop.set()
        for th in [*threads, pub]:
            th.join()
        wall = time.perf_counter() - t0
        stats = httpx.get(f"{base}/stats").json()
        ready = httpx.get(f"{base}/readyz").json()
        rss1 = server.memory_info().rss
        stop_server(proc)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    total = sum(len(v) for v in lat.values()) + len(errors)
    routes = {k: {"requests": len(v), "p50_ms": round(pct(v, 50) * 1e3, 2), "p99_ms": round(pct(v, 99) * 1e3, 2)}
              for k, v in sorted(lat.items())}
    all_lat = [x for v in lat.values() for x in v]
    result = {
        "clients": clients, "duration_s": round(wall, 1), "requests": total, "errors": len(errors),
        "req_per_s": round(total / wall, 1), "p50_ms": round(pct(all_lat, 50) * 1e3, 2),
        "p99_ms": round(pct(all_lat, 99) * 1e3, 2), "routes": routes,
        "versions_answering": len(versions), "versions_refused": refused, "rss_start_mb": round(rss0 / 2**20), "rss_peak_mb": round(peak / 2**20),
        "rss_end_mb": round(rss1 / 2**20), "served_at_end": stats["version"],
        "reload_error_at_end": (stats.get("reload_error") or {}).get("error"),
        "cpu_model": cpu_model(), "cores": os.cpu_count(), "loadavg": os.getloadavg(),
    }
    print(f"CPU: {result['cpu_model']} ({result['cores']} cores), load average {result['loadavg']}")
    print(f"server ready in {ready_s:.1f} s; {clients} clients for {wall:.0f} s")
    for e in events:
        print("  publish", e)
    print(f"requests {total}, errors {len(errors)}, {result['req_per_s']} req/s, p50 {result['p50_ms']} ms, "
          f"p99 {result['p99_ms']} ms")
    for k, v in routes.items():
        print(f"  {k:13s} {v['requests']:6d} requests, p50 {v['p50_ms']:7.2f} ms, p99 {v['p99_ms']:7.2f} ms")
    print(f"versions that answered requests: {len(versions)} -> {dict(versions)}")
    for name, why in refused.items():
        print(f"  refused {name}: {why}")
    print(f"served at the end: {stats['version']} (ready: {ready['status']}); last reload error: "
          f"{result['reload_error_at_end']}")
    print(f"server RSS: start {result['rss_start_mb']} MB, peak {result['rss_peak_mb']} MB, end {result['rss_end_mb']} MB")
    for e in errors[:10]:
        print("  ERROR", e)
    if out:
        out.write_text(json.dumps(result, indent=2))
    print("RESULT " + json.dumps(result))
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--duration", type=float, default=60.0)
    ap.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = ap.parse_args()
    r = soak(args.clients, args.duration, args.json)
    sys.exit(1 if r["errors"] else 0)


if __name__ == "__main__":
    main()
