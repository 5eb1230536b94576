"""Interleaved A/B of /search latency between two code trees, the same machine, the same load, back to back.

Why: on a shared 2-core VM the same code's p99 moves by tens of ms between runs minutes apart (other tenants,
host contention). Comparing a change against yesterday's results file measures the machine, not the change. This
starts the API from tree A, then from tree B, alternately (``--rounds`` pairs), each against the same 100k-record
artifact with the full-size ViT-B/32 text tower (random weights), and drives it with benchmarks/loadgen.py in the
open loop (requests due at ``--rate`` req/s, latency counted from each due time). It reports, per run, client p50 /
p99, the server's own encode p99 (Server-Timing) and the server's CPU per request, and the per-pair differences.

    python benchmarks/bench_search_ab.py --a-tree /path/to/old/checkout [--b-tree .] [--rounds 3] [--duration 25]

(an old checkout: ``git worktree add /tmp/old <commit>``). Last line: RESULT {json}.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import bench_search as bs  # noqa: E402

from curation_dagster.core.settings import model_cache_dir  # noqa: E402
from curation_dagster.core.system import cpu_model  # noqa: E402


def one_run(tree: Path, artifacts: Path, args, seed: int, log: Path) -> dict:
    import psutil

    proc, base, _ = bs.start_server(artifacts, {"CURATION_API_QUERY_CACHE_SIZE": "0"}, log, tree=tree)
    port = base.rsplit(":", 1)[1]
    try:
        bs.load_test(base, 40, 4, seed=99)  # warm-up
        srv = psutil.Process(proc.pid)
        c0 = sum(srv.cpu_times()[:2])
        n = int(args.rate * args.duration)
        out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "loadgen.py"), "--port", port, "--rate",
                              str(args.rate), "--requests", str(n), "--connections", str(args.clients), "--seed",
                              str(seed), "--arrivals", args.arrivals], capture_output=True, text=True, check=True)
        cpu_s = sum(srv.cpu_times()[:2]) - c0
    finally:
        bs.stop_server(proc)
    r = json.loads(out.stdout)
    lat = np.array(r["latencies_ms"])
    enc = np.array([bs.parse_server_timing(h).get("encode", 0.0) for h in r["server_timing"]])
    return {"requests": len(lat), "errors": len(r["errors"]), "req_per_s": round(len(lat) / r["wall_s"], 1),
            "p50_ms": round(float(np.percentile(lat, 50)), 1), "p99_ms": round(float(np.percentile(lat, 99)), 1),
            "server_encode_p99_ms": round(float(np.percentile(enc, 99)), 1),
            "server_cpu_ms_per_req": round(cpu_s / len(lat) * 1e3, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--a-tree", type=Path, required=True, help="the baseline checkout")
    ap.add_argument("--b-tree", type=Path, default=REPO, help="the changed checkout (default: this one)")
    ap.add_argument("--artifacts", type=Path, default=Path("/tmp/bench-search-ab-artifacts"),
                    help="100k-record artifact (built here if missing; reused across runs)")
    ap.add_argument("--corpus", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--rate", type=float, default=150.0)
    ap.add_argument("--duration", type=float, default=25.0)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--arrivals", default="poisson", choices=("poisson", "uniform"))
    args = ap.parse_args()
    model_dir = bs.save_full_size_clip(model_cache_dir() / "bench-clip-vit-b32-random")
    if not (args.artifacts / "curated").exists():
        bs.make_artifact(args.artifacts, str(model_dir), args.corpus)
    cpu = cpu_model()
    trees = {"A": args.a_tree.resolve(), "B": args.b_tree.resolve()}
    print(f"machine: {cpu}, {os.cpu_count()} cores; A = {trees['A']}, B = {trees['B']}; {args.rate:g} req/s "
          f"{args.arrivals}, {args.clients} connections, {args.duration:g} s per run, query cache off")
    runs: dict[str, list[dict]] = {"A": [], "B": []}
    for i in range(args.rounds):
        for side in ("A", "B"):
            r = one_run(trees[side], args.artifacts, args, seed=3 + i, log=Path(f"/tmp/bench-search-ab-{side}.log"))
            runs[side].append(r)
            print(f"round {i + 1} {side}: p50 {r['p50_ms']:6.1f} ms  p99 {r['p99_ms']:6.1f} ms  server encode p99 "
                  f"{r['server_encode_p99_ms']:6.1f} ms  server CPU {r['server_cpu_ms_per_req']:.2f} ms/request  "
                  f"{r['req_per_s']} req/s  errors {r['errors']}  [{cpu}]", flush=True)
    d_p99 = [b["p99_ms"] - a["p99_ms"] for a, b in zip(runs["A"], runs["B"])]
    d_cpu = [b["server_cpu_ms_per_req"] - a["server_cpu_ms_per_req"] for a, b in zip(runs["A"], runs["B"])]
    print(f"B - A per round: p99 {', '.join(f'{d:+.1f}' for d in d_p99)} ms; server CPU "
          f"{', '.join(f'{d:+.2f}' for d in d_cpu)} ms/request  [{cpu}]")
    print("RESULT " + json.dumps({"cpu_model": cpu, "cores": os.cpu_count(), "rate": args.rate,
                                  "arrivals": args.arrivals, "clients": args.clients, "trees": {k: str(v) for k, v in trees.items()},
                                  "runs": runs, "b_minus_a_p99_ms": d_p99, "b_minus_a_server_cpu_ms": d_cpu}))


if __name__ == "__main__":
    main()
