"""Benchmark: embedding-space deduplication (curation_dagster.core.dedup.find_duplicates) at scale.

Synthetic 512-d unit vectors: Gaussian background (near-orthogonal in high dimension) with planted near-duplicate
groups of 2-4 rows, each member at an exact cosine in [0.96, 0.995] to its group's base row. Reports wall time,
peak RSS, recall of planted pairs (both rows of a planted pair end in one found group) and false merges (found
groups mixing rows of different planted groups / background). In the same run, the baseline a user would
otherwise write: scikit-learn NearestNeighbors(metric="cosine", algorithm="brute").radius_neighbors + connected
components, at the sizes where it fits. Targets (2-core machine): 1M in <= 10 min and <= 6 GB with recall >= 0.99;
>= 10x faster than the baseline at 100k.

    python benchmarks/bench_dedup.py --sizes 10000,100000,1000000
    python benchmarks/bench_dedup.py --sizes 10000,100000 --compare-exact   # exact vs IVF crossover
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from curation_dagster.core.dedup import DedupConfig, find_duplicates  # noqa: E402

CHUNK = 65536


class PeakRSS:
    """Samples this process' RSS in a thread; peak over the with-block (faiss/BLAS allocations are invisible
    to tracemalloc, so RSS is the honest number)."""

    def __init__(self, interval: float = 0.02):
        self.proc = psutil.Process()
        self.interval = interval

    def __enter__(self):
        gc.collect()
        self.start = self.proc.memory_info().rss
        self.peak = self.start
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


def make_data(n: int, d: int, dup_frac: float, lo: float, hi: float, seed: int):
    """Returns (x float32 [n, d] unit rows, label int64 [n]: planted group id, or -1 - row for background)."""
    rng = np.random.default_rng(seed)
    x = np.empty((n, d), dtype=np.float32)
    for s in range(0, n, CHUNK):
        block = rng.standard_normal((min(CHUNK, n - s), d), dtype=np.float32)
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        x[s:s + block.shape[0]] = block
    label = -1 - np.arange(n, dtype=np.int64)
    n_dup_rows = int(round(dup_frac * n))
    sizes = []
    while sum(sizes) < n_dup_rows:
        sizes.append(int(rng.integers(2, 5)))
    rows = rng.permutation(n)[: sum(sizes)]
    pos = 0
    for g, size in enumerate(sizes):
        members = rows[pos:pos + size]
        pos += size
        base = x[members[0]].astype(np.float64)
        label[members] = g
        for m in members[1:]:
            c = rng.uniform(lo, hi)
            u = rng.standard_normal(d)
            u -= u.dot(base) * base
            u /= np.linalg.norm(u)
            x[m] = (c * base + np.sqrt(1 - c * c) * u).astype(np.float32)
    return x, label, len(sizes)


def score(groups: np.ndarray, label: np.ndarray):
    """(recall of planted pairs, number of planted pairs, false-merged groups)."""
    planted = label >= 0
    found, total = 0, 0
    order = np.argsort(label[planted], kind="stable")
    pl, pg = label[planted][order], groups[planted][order]
    bounds = np.flatnonzero(np.diff(pl)) + 1
    for lab_rows_g in np.split(pg, bounds):
        m = lab_rows_g.size
        total += m * (m - 1) // 2
        _, counts = np.unique(lab_rows_g, return_counts=True)
        found += int((counts * (counts - 1) // 2).sum())
    # a found group (size >= 2) is a false merge if it mixes labels (background rows have unique labels)
    gs, gcount = np.unique(groups, return_counts=True)
    multi = np.isin(groups, gs[gcount > 1])
    false_groups = 0
    if multi.any():
        pairs = np.unique(np.stack([groups[multi], label[multi]], axis=1), axis=0)
        g_ids, n_labels = np.unique(pairs[:, 0], return_counts=True)
        false_groups = int((n_labels > 1).sum())
    return (found / total if total else 1.0), total, false_groups


def run_ours(x, cfg):
    rid = np.arange(x.shape[0], dtype=np.int64)
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        res = find_duplicates(x, None, None, None, rid, cfg)
        wall = time.perf_counter() - t0
    return res.dup_group, wall, mem, res.search.get("image", {})


def run_sklearn(x, threshold):
    from scipy import sparse
    from scipy.sparse import csgraph
    from sklearn.neighbors import NearestNeighbors

    with PeakRSS() as mem:
        t0 = time.perf_counter()
        nn = NearestNeighbors(metric="cosine", algorithm="brute").fit(x)
        ind = nn.radius_neighbors(x, radius=1.0 - threshold, return_distance=False)
        lens = np.fromiter((len(a) for a in ind), dtype=np.int64, count=len(ind))
        rows = np.repeat(np.arange(len(ind)), lens)
        cols = np.concatenate(ind)
        g = sparse.coo_matrix((np.ones(rows.size, np.int8), (rows, cols)), shape=(len(ind),) * 2)
        _, comp = csgraph.connected_components(g, directed=False)
        wall = time.perf_counter() - t0
    return comp, wall, mem


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--dup-frac", type=float, default=0.01)
    ap.add_argument("--cos-range", default="0.96,0.995")
    ap.add_argument("--threshold", type=float, default=0.95)
    ap.add_argument("--baseline-max", type=int, default=100_000,
                    help="largest N for the sklearn brute-force baseline (O(N^2) time)")
    ap.add_argument("--compare-exact", action="store_true",
                    help="also run our search forced exact and forced IVF at every size (crossover)")
    ap.add_argument("--threads", type=int, default=None, help="faiss threads (default: available cores)")
    ap.add_argument("--nprobe", type=int, default=None, help="override DedupConfig.nprobe")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    lo, hi = (float(v) for v in args.cos_range.split(","))
    extra = {} if args.nprobe is None else {"nprobe": args.nprobe}
    cfg = DedupConfig(image_threshold=args.threshold, text_threshold=None, use_sha256=False, threads=args.threads,
                      **extra)

    print(f"machine: {psutil.cpu_count()} logical cores, affinity {len(os.sched_getaffinity(0))}, "
          f"load avg {os.getloadavg()[0]:.2f} (other processes share these cores), "
          f"RAM {psutil.virtual_memory().total / 2**30:.1f} GiB")
    print(f"config: {cfg}")
    hdr = f"{'N':>9} {'method':<22} {'wall s':>8} {'peak RSS GiB':>12} {'+RSS GiB':>9} {'recall':>7} " \
          f"{'pairs':>7} {'false':>6} {'search'}"
    print(hdr)
    print("-" * len(hdr))
    for n in sizes:
        t0 = time.perf_counter()
        x, label, n_groups = make_data(n, args.dim, args.dup_frac, lo, hi, args.seed)
        gen = time.perf_counter() - t0
        print(f"# N={n}: generated {n}x{args.dim} float32 ({x.nbytes / 2**30:.2f} GiB) with {n_groups} planted "
              f"groups in {gen:.1f}s; load avg {os.getloadavg()[0]:.2f}", flush=True)
        runs = [("find_duplicates (default)", cfg)]
        if args.compare_exact:
            runs += [("  forced exact", DedupConfig(**{**cfg.to_dict(), "exact_max": n})),
                     ("  forced ivf", DedupConfig(**{**cfg.to_dict(), "exact_max": 0}))]
        ours_wall = None
        for name, c in runs:
            groups, wall, mem, info = run_ours(x, c)
            rec, total, false = score(groups, label)
            ours_wall = wall if ours_wall is None else ours_wall
            print(f"{n:>9} {name:<22} {wall:>8.2f} {mem.peak / 2**30:>12.2f} {(mem.peak - mem.start) / 2**30:>9.2f} "
                  f"{rec:>7.4f} {total:>7} {false:>6} {info}", flush=True)
        if n <= args.baseline_max:
            comp, wall, mem = run_sklearn(x, args.threshold)
            rec, total, false = score(comp, label)
            print(f"{n:>9} {'sklearn brute radius':<22} {wall:>8.2f} {mem.peak / 2**30:>12.2f} "
                  f"{(mem.peak - mem.start) / 2**30:>9.2f} {rec:>7.4f} {total:>7} {false:>6}", flush=True)
            print(f"# N={n}: speedup find_duplicates vs sklearn baseline: {wall / ours_wall:.1f}x", flush=True)
        else:
            print(f"# N={n}: sklearn baseline skipped (N > --baseline-max={args.baseline_max}): brute-force radius "
                  f"search is O(N^2), {n * n * args.dim * 2 / 1e12:.1f} TFLOP at N={n}, i.e. "
                  f"{(n / 100_000) ** 2:.2g}x the work of N=100000", flush=True)
        del x, label
        gc.collect()


if __name__ == "__main__":
    main()
