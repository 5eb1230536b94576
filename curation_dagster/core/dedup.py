"""Embedding-space deduplication: kNN graph -> thresholded edges -> connected components -> keep the best member.

Evidence, each with its own rule, any one of which joins two rows:
  * image embeddings: cosine >= ``image_threshold`` (re-uploads, resized / re-encoded copies of a photo);
  * text embeddings:  cosine >= ``text_threshold`` (the same listing under another product id);
  * exact image sha256 (byte-identical files; cosine 1.0 by definition).

Search is faiss inner product on L2-normalised float32 vectors, always in query batches, so memory is
O(n * d) for the vectors plus O(batch_size * k) for results, never an n x n matrix:
  * n <= ``exact_max``: exact brute force (``faiss.knn``: blocked BLAS, no copy of the vectors);
  * above: IVF (k-means cells; each query scans its ``nprobe`` nearest cells) with 4-bit PQ fast-scan codes,
    whose ``(k+1) * refine_factor`` best candidates are then re-scored exactly against the original vectors, so
    every reported similarity is an exact cosine. IVF was chosen over SemDeDup-style "all pairs inside one
    k-means cluster" because multi-probe search also finds the pairs that straddle a cluster boundary, which
    single-assignment clustering silently misses; near duplicates almost always share one of the few nearest
    cells, so recall stays >= 0.99 at a fraction of the cost (numbers in benchmarks/bench_dedup.py).

Each row keeps its ``k`` nearest neighbours (a row whose list is all above the threshold is searched wider: see
knn_edges); edges are symmetrised and merged into groups with ``scipy.sparse.csgraph.connected_components``
(chains A~B~C form one group even if A and C are far apart).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields

import numpy as np

from .system import available_cpus
from scipy import sparse
from scipy.sparse import csgraph

__all__ = ["DedupConfig", "DedupResult", "duplicate_graph", "duplicate_groups", "find_duplicates", "knn_edges", "max_cross_similarity",
           "pick_keepers"]

# evidence codes, in priority order when several kinds link the same pair
_SHA, _IMAGE, _TEXT = 0, 1, 2
_REASONS = np.array(["sha256", "image", "text"], dtype=object)

Progress = Callable[[str, int, int], None]  # (stage, done, total)


@dataclass(frozen=True)
class DedupConfig:
    image_threshold: float | None = 0.95  # None disables a modality
    text_threshold: float | None = 0.99  # high: product series (magazine issues) share near-identical titles
    use_sha256: bool = True
    k: int = 16  # neighbours per row (excluding itself)
    # Exact search up to this many rows, IVF above. Not the speed crossover (~10k, bench_dedup) but recall: on dense
    # embeddings the approximate path misses pairs the exact curated_no_duplicates_left check then finds (the 85k
    # rehearsal: 3,131 rows left by image), so the whole Rakuten catalogue (~99k rows) is searched exactly.
    exact_max: int = 100_000
    nlist: int | None = None  # IVF cells; auto: ~sqrt(n)
    nprobe: int = 16  # cells scanned per query
    batch_size: int = 16384  # query rows per search call
    refine_factor: int = 2  # IVF path: (k+1) * refine_factor approximate candidates re-scored exactly
    threads: int | None = None  # faiss OpenMP threads; None: the cores this process may use

    def __post_init__(self) -> None:
        for name in ("image_threshold", "text_threshold"):
            t = getattr(self, name)
            if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float))
                                  or not math.isfinite(t) or not 0.0 < t <= 1.0):
                raise ValueError(f"{name} must be a cosine in (0, 1] or None; got {t!r}")
        for name, lo in (("k", 1), ("exact_max", 0), ("nprobe", 1), ("batch_size", 1), ("refine_factor", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{name} must be an int >= {lo}; got {v!r}")
        if self.threads is not None and (isinstance(self.threads, bool) or not isinstance(self.threads, int)
                                         or self.threads < 1):
            raise ValueError(f"threads must be an int >= 1 or None; got {self.threads!r}")
        if self.nlist is not None and (isinstance(self.nlist, bool) or not isinstance(self.nlist, int)
                                       or self.nlist < 1):
            raise ValueError(f"nlist must be an int >= 1 or None; got {self.nlist!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DedupConfig":
        """The settings recorded by :meth:`to_dict` (e.g. in a manifest); other keys (results) are ignored."""
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})


@dataclass
class DedupResult:
    keep: np.ndarray  # bool [n]
    dup_group: np.ndarray  # int64 [n]: record_id of the group's kept member (singleton: its own record_id)
    duplicate_of: np.ndarray  # int64 [n]: record_id of the kept row this row duplicates; -1 for kept rows
    similarity: np.ndarray  # float32 [n]: evidence linking a removed row to its kept row; nan for kept rows
    reason: np.ndarray  # object [n]: "" for kept rows, else "image" / "text" / "sha256"
    n_edges: dict  # {"image": int, "text": int, "sha256": int}: distinct linked pairs per evidence kind
    search: dict = field(default_factory=dict)  # how each modality was searched (method, nlist, nprobe, k)
    keeper: np.ndarray | None = None  # int64 [n]: row index of each row's kept member (itself when kept)

    @property
    def n_removed(self) -> int:
        return int((~self.keep).sum())

    @property
    def n_groups(self) -> int:
        """Groups with at least two members."""
        return int(np.unique(self.dup_group[~self.keep]).size)


def _set_threads(requested: int | None = None) -> int:
    """Bound faiss' OpenMP threads by the cores this process may actually use (containers, taskset)."""
    import faiss

    n = max(1, min(requested or available_cpus(), available_cpus()))
    faiss.omp_set_num_threads(n)
    return n


def _unit_float32(x: np.ndarray, name: str, n: int | None = None, chunk: int = 65536) -> np.ndarray:
    """Validated float32 C-contiguous rows of unit norm. Returns the input itself when it already is one
    (no 2 GB copy at 1M x 512); otherwise a normalised copy. Checked in chunks to bound temporaries."""
    a = np.asarray(x)
    if a.ndim != 2 or a.shape[1] == 0:
        raise ValueError(f"{name} must be a 2-D array [n, d] with d >= 1; got shape {a.shape}")
    if n is not None and a.shape[0] != n:
        raise ValueError(f"{name} has {a.shape[0]} rows, expected {n}")
    if a.dtype != np.float32 or not a.flags.c_contiguous:
        a = np.ascontiguousarray(a, dtype=np.float32)
    needs_norm = False
    for s in range(0, a.shape[0], chunk):
        block = a[s:s + chunk]
        if not np.isfinite(block).all():
            bad = s + np.flatnonzero(~np.isfinite(block).all(axis=1))
            raise ValueError(f"{name} has non-finite values, first rows: {bad[:5].tolist()}")
        norms = np.linalg.norm(block, axis=1)
        if (norms <= 1e-12).any():
            bad = s + np.flatnonzero(norms <= 1e-12)
            raise ValueError(f"{name} has zero-norm rows {bad[:5].tolist()} (cosine undefined)")
        needs_norm |= bool((np.abs(norms - 1.0) > 1e-4).any())
    if needs_norm:
        if a is x or np.shares_memory(a, np.asarray(x)):
            a = a.copy()
        for s in range(0, a.shape[0], chunk):
            block = a[s:s + chunk]
            block /= np.linalg.norm(block, axis=1, keepdims=True)
    return a


def _auto_nlist(n: int) -> int:
    """~sqrt(n) cells: assigning rows to cells (a dense GEMM, n * nlist) is the dominant cost with fast-scan
    codes, so fewer, larger cells than the usual 4*sqrt(n); faiss wants >= 39 training points per cell."""
    return int(max(1, min(round(math.sqrt(n)), n // 39)))


def _build_ivf(x: np.ndarray, config: DedupConfig, stage: str, progress: Progress | None):
    """IVF index over x for the partitioned path.

    Cells are scanned with 4-bit PQ fast-scan codes (``IVF{nlist},PQ{d/16}x4fs``) and the candidates
    re-scored exactly against x. Measured on this 2-core machine, scanning float vectors (IndexIVFFlat)
    ran at ~2 GFLOP/s, which puts 1M rows near an hour; fast-scan codes plus exact re-scoring of
    ``(k+1) * refine_factor`` candidates did 1M x 512 in ~2.6 min, 2.3 GB peak RSS (input included), planted-pair
    recall 1.0 (benchmarks/bench_dedup.py, 2 cores shared with other work).
    Dimensions that PQ fast-scan cannot split (d not a multiple of 32) fall back to IndexIVFFlat.
    """
    import faiss

    n, d = x.shape
    nlist = min(config.nlist or _auto_nlist(n), n)
    use_pq = d % 32 == 0
    spec = f"IVF{nlist},PQ{d // 16}x4fs" if use_pq else f"IVF{nlist},Flat"
    index = faiss.index_factory(d, spec, faiss.METRIC_INNER_PRODUCT)
    ivf = faiss.extract_index_ivf(index)
    ivf.cp.niter = 10
    ivf.cp.max_points_per_centroid = 32  # coarse cells only need to be roughly right; bounds training time
    ivf.cp.min_points_per_centroid = 16  # (faiss warns below 39 by default; 32 per cell is ample here)
    ivf.cp.seed = 1234
    n_train = min(n, 32 * nlist)
    if n_train == n:
        train = x
    else:
        rng = np.random.default_rng(1234)
        train = x[np.sort(rng.choice(n, size=n_train, replace=False))]
    if progress is not None:
        progress(f"{stage}: train {spec}", 0, n)
    # training is many tiny k-means steps (PQ sub-quantizers have 16 centroids): OpenMP barriers cost more than
    # they save there, and 10-20x more when other processes share the cores (measured), so train on one thread
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        index.train(train)
    finally:
        faiss.omp_set_num_threads(threads)
    del train
    add_chunk = max(config.batch_size, 131072)  # few large adds: fast-scan repacks per call
    for s in range(0, n, add_chunk):
        index.add(x[s:s + add_chunk])
        if progress is not None:
            progress(f"{stage}: index", min(s + add_chunk, n), n)
    ivf.nprobe = min(config.nprobe, nlist)
    info = {"method": "ivf", "index": spec, "k": config.k, "nlist": nlist, "nprobe": int(ivf.nprobe),
            "n_train": n_train, "refine": use_pq, "refine_factor": config.refine_factor if use_pq else None}
    return index, info


def _searcher(x: np.ndarray, config: DedupConfig, stage: str, progress: Progress | None,
              ) -> tuple[dict, Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]]:
    """Search info and ``search(q, kk)``: the kk nearest rows of x (self included) of each query row, exact
    similarities (exact search up to ``exact_max`` rows, IVF candidates re-scored exactly above)."""
    import faiss

    n, d = x.shape
    if n <= config.exact_max:
        def search(q: np.ndarray, kk: int) -> tuple[np.ndarray, np.ndarray]:
            return faiss.knn(q, x, kk, metric=faiss.METRIC_INNER_PRODUCT)

        return {"method": "exact", "k": config.k}, search
    index, info = _build_ivf(x, config, stage, progress)

    def search(q: np.ndarray, kk: int) -> tuple[np.ndarray, np.ndarray]:
        n_cand = min(n, kk * config.refine_factor) if info["refine"] else kk
        D, I = index.search(q, n_cand)
        if not info["refine"]:
            return D, I
        # exact re-scoring of the approximate candidates against the original vectors (no copy of x)
        S = np.empty(I.shape, dtype=np.float32)
        faiss.fvec_inner_products_by_idx(faiss.swig_ptr(S), faiss.swig_ptr(q), faiss.swig_ptr(x),
                                         faiss.swig_ptr(I), d, q.shape[0], n_cand)
        S[I < 0] = -np.inf
        top = np.argsort(-S, axis=1, kind="stable")[:, :kk]
        return np.take_along_axis(S, top, axis=1), np.take_along_axis(I, top, axis=1)

    return info, search


def _knn(x: np.ndarray, k: int, config: DedupConfig, stage: str, progress: Progress | None,
         ) -> tuple[dict, Iterator[tuple[int, np.ndarray, np.ndarray]]]:
    """Search info and a generator of (first_row, D, I) batches: the k+1 nearest neighbours (self included)
    of every row of x, in row order. Only one batch of results is alive at a time."""
    n = x.shape[0]
    kk = min(k + 1, n)
    info, search = _searcher(x, config, stage, progress)

    def batches() -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        for s in range(0, n, config.batch_size):
            D, I = search(x[s:s + config.batch_size], kk)
            yield s, D, I
            if progress is not None:
                progress(stage, min(s + config.batch_size, n), n)

    return info, batches()


MAX_WIDENED_K = 1024  # neighbours a saturated row is searched to at most (one clump of that many is resolved)
_WIDEN_ENTRIES = 1 << 22  # query rows x neighbours per widened search call (~50 MB of results)


def _pairs(rows: np.ndarray, D: np.ndarray, I: np.ndarray, threshold: float):
    mask = (D >= threshold) & (I >= 0) & (I != rows[:, None])
    r, c = np.nonzero(mask)
    return rows[r], I[r, c].astype(np.int64), D[r, c].astype(np.float32)


def knn_edges(x: np.ndarray, threshold: float, config: DedupConfig = DedupConfig(), stage: str = "knn",
              progress: Progress | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """Distinct pairs (u < v) with cosine >= threshold among each row's nearest neighbours.

    Each row is searched to its ``k`` nearest; a row whose k-th neighbour is still above the threshold
    ("saturated": it sits in a clump of more than k near-copies) is searched again with 4x the neighbours, up to
    MAX_WIDENED_K. Without that, two clumps of 17+ re-encoded copies each (stock photos, placeholders) that are
    duplicates of each other never met: every row's k=16 list was filled by its own clump, no edge crossed, and both
    clumps kept a member. Returns (u, v, sim, search_info); x must be float32 unit rows (see find_duplicates).
    """
    _set_threads(config.threads)
    n = x.shape[0]
    us, vs, ss, saturated = [], [], [], []
    info, search = _searcher(x, config, stage, progress)
    kk = min(config.k + 1, n)
    for start in range(0, n, config.batch_size):
        rows = np.arange(start, min(start + config.batch_size, n), dtype=np.int64)
        D, I = search(x[rows], kk)
        for acc, part in zip((us, vs, ss), _pairs(rows, D, I, threshold)):
            acc.append(part)
        if kk < n:
            saturated.append(rows[D[:, -1] >= threshold])
        if progress is not None:
            progress(stage, int(rows[-1]) + 1, n)
    todo = np.concatenate(saturated) if saturated else np.zeros(0, np.int64)
    info["saturated_rows"] = int(todo.size)
    while todo.size and kk < min(n, MAX_WIDENED_K + 1):
        kk = min(kk * 4, n, MAX_WIDENED_K + 1)
        still = []
        step = max(1, _WIDEN_ENTRIES // kk)
        for s in range(0, todo.size, step):
            rows = todo[s:s + step]
            D, I = search(x[rows], kk)
            for acc, part in zip((us, vs, ss), _pairs(rows, D, I, threshold)):
                acc.append(part)
            if kk < n:
                still.append(rows[D[:, -1] >= threshold])
        todo = np.concatenate(still) if still else np.zeros(0, np.int64)
        info["widened_to_k"] = kk - 1
    info["saturated_unresolved"] = int(todo.size)  # still full at MAX_WIDENED_K: the blocking check would tell
    u = np.concatenate(us) if us else np.zeros(0, np.int64)
    v = np.concatenate(vs) if vs else np.zeros(0, np.int64)
    sim = np.concatenate(ss) if ss else np.zeros(0, np.float32)
    lo, hi = np.minimum(u, v), np.maximum(u, v)
    # each pair is usually found from both ends: keep one copy (the higher similarity)
    order = np.lexsort((-sim, hi, lo))
    lo, hi, sim = lo[order], hi[order], sim[order]
    first = np.ones(lo.size, dtype=bool)
    first[1:] = (lo[1:] != lo[:-1]) | (hi[1:] != hi[:-1])
    return lo[first], hi[first], np.minimum(sim[first], np.float32(1.0)), info


def _sha_keys(sha256: Sequence[str | None], n: int) -> np.ndarray:
    """Normalised hashes (stripped, lower case); "" for a missing one."""
    if len(sha256) != n:
        raise ValueError(f"sha256 has {len(sha256)} entries, expected {n}")
    return np.array([("" if h is None else str(h).strip().lower()) for h in sha256], dtype=object)


def _sha_edges(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Star edges (first row of each hash -> the others); empty / missing hashes never link."""
    valid = np.flatnonzero(keys != "")
    if valid.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    _, first_idx, inverse = np.unique(keys[valid].astype(str), return_index=True, return_inverse=True)
    head = valid[first_idx][inverse]
    other = head != valid
    return head[other].astype(np.int64), valid[other].astype(np.int64)


def find_duplicates(image_emb: np.ndarray | None, text_emb: np.ndarray | None, sha256: Sequence[str | None] | None,
                    alignment_score: np.ndarray | None, record_ids: np.ndarray, config: DedupConfig = DedupConfig(),
                    progress: Progress | None = None, prefer: np.ndarray | None = None) -> DedupResult:
    """Group duplicates and keep one row per group: identify the links, group them, pick keepers, explain removals.

    Keep rule: the member with the highest ``prefer`` (an integer rank per row, e.g. "labelled"; None: all equal),
    then the highest ``alignment_score`` (ties, or ``alignment_score=None``: the lowest record_id). For each removed
    row, ``duplicate_of`` is the kept row's record_id and ``similarity``/``reason`` the evidence linking them:
      * direct, when the removed and kept rows are themselves linked (same sha256 -> "sha256", 1.0; else image
        cosine >= image_threshold -> "image"; else text cosine >= text_threshold -> "text"; checked in that order);
      * otherwise (a chain A~B~C) the path evidence: the weakest edge on the strongest path to the kept row
        (maximum-bottleneck path, from a maximum spanning tree of the group), with that edge's kind.
    ``progress(stage, done, total)`` is called after each search batch. The search and the choice of keepers are
    also available apart (duplicate_graph, pick_keepers): curation chooses keepers twice on one search.
    """
    graph = duplicate_graph(image_emb, text_emb, sha256, record_ids, config, progress)
    return pick_keepers(graph, alignment_score, prefer)


def duplicate_graph(image_emb: np.ndarray | None, text_emb: np.ndarray | None, sha256: Sequence[str | None] | None,
                    record_ids: np.ndarray, config: DedupConfig = DedupConfig(),
                    progress: Progress | None = None) -> "_Links":
    """The duplicate links of find_duplicates (the expensive part: the searches), before any keeper is chosen."""
    rid = _checked_ids(record_ids)
    n = rid.shape[0]
    modalities: list[tuple[int, str, np.ndarray, float]] = []
    if image_emb is not None and config.image_threshold is not None:
        modalities.append((_IMAGE, "image", image_emb, config.image_threshold))
    if text_emb is not None and config.text_threshold is not None:
        modalities.append((_TEXT, "text", text_emb, config.text_threshold))
    use_sha = config.use_sha256 and sha256 is not None
    if not modalities and not use_sha:
        raise ValueError("no duplicate evidence enabled: give image_emb/text_emb with a threshold, or sha256")
    if n == 0:
        empty = np.zeros(0, np.int64)
        links = _Links(empty, empty, np.zeros(0, np.float32), np.zeros(0, np.int8), {}, None,
                       {"image": 0, "text": 0, "sha256": 0}, {})
    else:
        links = _identify_links(modalities, sha256 if use_sha else None, n, config, progress)
    links.rid, links.modalities, links.config = rid, modalities, config
    return links


def pick_keepers(graph: "_Links", alignment_score: np.ndarray | None, prefer: np.ndarray | None = None) -> DedupResult:
    """One kept row per group of ``graph`` (see find_duplicates for the rule) and the evidence for each removal."""
    rid = graph.rid
    n = rid.shape[0]
    score = _checked_scores(alignment_score, n)
    rank = np.zeros(n, np.int64) if prefer is None else np.asarray(prefer).astype(np.int64)
    if rank.shape != (n,):
        raise ValueError(f"prefer must have shape ({n},); got {rank.shape}")
    if n == 0:
        return DedupResult(keep=np.zeros(0, bool), dup_group=np.zeros(0, np.int64),
                           duplicate_of=np.zeros(0, np.int64), similarity=np.zeros(0, np.float32),
                           reason=np.zeros(0, dtype=object), n_edges=graph.n_edges, search=graph.search,
                           keeper=np.zeros(0, np.int64))
    keeper = _keepers(n, graph.u, graph.v, rid, score, rank)
    keep = keeper == np.arange(n)
    dup_group = rid[keeper]
    duplicate_of = np.where(keep, -1, dup_group).astype(np.int64)
    similarity, reason = _removal_evidence(graph, keeper, keep, graph.modalities, graph.config)
    return DedupResult(keep=keep, dup_group=dup_group, duplicate_of=duplicate_of, similarity=similarity,
                       reason=reason, n_edges=graph.n_edges, search=graph.search, keeper=keeper)


def _checked_ids(record_ids: np.ndarray) -> np.ndarray:
    rid = np.asarray(record_ids)
    if rid.ndim != 1:
        raise ValueError(f"record_ids must be 1-D; got shape {rid.shape}")
    n = rid.shape[0]
    if n and rid.dtype.kind not in "iu":
        raise ValueError(f"record_ids must be integers; got dtype {rid.dtype}")
    rid = rid.astype(np.int64)
    if np.unique(rid).size != n:
        raise ValueError("record_ids must be unique (the keep rule breaks ties by record_id)")
    return rid


def _checked_scores(alignment_score: np.ndarray | None, n: int) -> np.ndarray:
    if alignment_score is None:
        return np.zeros(n, dtype=np.float64)
    score = np.asarray(alignment_score, dtype=np.float64)
    if score.shape != (n,):
        raise ValueError(f"alignment_score must have shape ({n},); got {score.shape}")
    if not np.isfinite(score).all():
        raise ValueError("alignment_score contains non-finite values")
    return score


@dataclass
class _Links:
    """The duplicate graph: one edge per linked pair (u < v) with its similarity and the kind of evidence."""

    u: np.ndarray
    v: np.ndarray
    sim: np.ndarray
    kind: np.ndarray
    units: dict[int, np.ndarray]  # unit-norm float32 embeddings per modality code
    sha_keys: np.ndarray | None
    n_edges: dict
    search: dict
    rid: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    modalities: list = field(default_factory=list)
    config: DedupConfig = field(default_factory=DedupConfig)


def _identify_links(modalities, sha256, n: int, config: DedupConfig, progress) -> _Links:
    n_edges = {"image": 0, "text": 0, "sha256": 0}
    search: dict = {}
    eu, ev, es, ek = [], [], [], []
    units: dict[int, np.ndarray] = {}
    for code, name, emb, thr in modalities:
        x = _unit_float32(emb, f"{name}_emb", n)
        units[code] = x
        if n < 2:
            search[name] = {"method": "none", "k": config.k}
            continue
        u, v, s, info = knn_edges(x, thr, config, stage=f"dedup {name}", progress=progress)
        search[name] = info
        n_edges[name] = int(u.size)
        eu.append(u), ev.append(v), es.append(s), ek.append(np.full(u.size, code, np.int8))
    sha_keys = None
    if sha256 is not None:
        sha_keys = _sha_keys(sha256, n)
        hu, hv = _sha_edges(sha_keys)
        n_edges["sha256"] = int(hu.size)
        eu.append(np.minimum(hu, hv)), ev.append(np.maximum(hu, hv))
        es.append(np.ones(hu.size, np.float32)), ek.append(np.full(hu.size, _SHA, np.int8))

    u = np.concatenate(eu) if eu else np.zeros(0, np.int64)
    v = np.concatenate(ev) if ev else np.zeros(0, np.int64)
    sim = np.concatenate(es) if es else np.zeros(0, np.float32)
    kind = np.concatenate(ek) if ek else np.zeros(0, np.int8)
    # one edge per pair across evidence kinds: sha256 first, then image, then text
    order = np.lexsort((kind, v, u))
    u, v, sim, kind = u[order], v[order], sim[order], kind[order]
    first = np.ones(u.size, dtype=bool)
    first[1:] = (u[1:] != u[:-1]) | (v[1:] != v[:-1])
    return _Links(u[first], v[first], sim[first], kind[first], units, sha_keys, n_edges, search)


def _components(n: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    graph = sparse.coo_matrix((np.ones(u.size, np.int8), (u, v)), shape=(n, n)).tocsr()
    return csgraph.connected_components(graph, directed=False)[1]


def duplicate_groups(graph: "_Links") -> np.ndarray:
    """The duplicate group of each row of ``graph`` (an id per row; a row without duplicates is alone in its own):
    the evaluation keeps each group on one side of its test split."""
    return _components(graph.rid.shape[0], graph.u, graph.v).astype(np.int64)


def _keepers(n: int, u: np.ndarray, v: np.ndarray, rid: np.ndarray, score: np.ndarray,
             rank: np.ndarray) -> np.ndarray:
    """Row index of the kept member of each row's group (connected component): highest rank, best score, then
    lowest record_id."""
    comp = _components(n, u, v)
    order = np.lexsort((rid, -score, -rank, comp))
    is_first = np.ones(n, dtype=bool)
    is_first[1:] = comp[order][1:] != comp[order][:-1]
    keeper_of_comp = np.empty(comp.max() + 1, dtype=np.int64)
    keeper_of_comp[comp[order][is_first]] = order[is_first]
    return keeper_of_comp[comp]


def _removal_evidence(links: _Links, keeper: np.ndarray, keep: np.ndarray, modalities,
                      config: DedupConfig) -> tuple[np.ndarray, np.ndarray]:
    """(similarity, reason) per row: for each removed row the evidence linking it to its kept row."""
    n = keeper.shape[0]
    similarity = np.full(n, np.nan, dtype=np.float32)
    reason = np.full(n, "", dtype=object)
    removed = np.flatnonzero(~keep)
    if not removed.size:
        return similarity, reason
    kept_rows = keeper[removed]
    direct_sim = np.full(removed.size, np.nan, dtype=np.float32)
    direct_kind = np.full(removed.size, -1, dtype=np.int8)
    # checked in priority order; the first kind that links the pair wins
    checks: list[tuple[int, np.ndarray]] = []
    if links.sha_keys is not None:
        sha_keys = links.sha_keys
        linked = (sha_keys[removed] == sha_keys[kept_rows]) & (sha_keys[removed] != "")
        checks.append((_SHA, np.where(linked, np.float32(1.0), np.float32(-np.inf))))
    thr_of = {_IMAGE: config.image_threshold, _TEXT: config.text_threshold}
    for code, _, _, _ in modalities:
        x = links.units[code]
        cos = np.einsum("ij,ij->i", x[removed], x[kept_rows], dtype=np.float32)
        cos = np.minimum(cos, np.float32(1.0))
        checks.append((code, np.where(cos >= thr_of[code], cos, np.float32(-np.inf))))
    for code, vals in checks:
        fill = (direct_kind < 0) & np.isfinite(vals)
        direct_sim[fill] = vals[fill]
        direct_kind[fill] = code
    similarity[removed] = direct_sim
    has = direct_kind >= 0
    reason[removed[has]] = _REASONS[direct_kind[has]]
    chained = removed[~has]
    if chained.size:
        ps, pk = _path_evidence(n, links.u, links.v, links.sim, links.kind, keeper, chained)
        similarity[chained] = ps
        reason[chained] = _REASONS[pk]
    return similarity, reason


def _path_evidence(n: int, u: np.ndarray, v: np.ndarray, sim: np.ndarray, kind: np.ndarray, keeper: np.ndarray,
                   targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Weakest edge on the maximum-bottleneck path from each target row to its keeper.

    The path between two nodes in a maximum spanning tree is a maximum-bottleneck path. We root every tree at
    its keeper through one virtual node and walk the BFS order once, carrying the running minimum.
    """
    # only edges inside groups that contain a target matter; weights 2 - sim > 0 (scipy drops zero weights)
    groups = np.unique(keeper[targets])
    in_groups = np.isin(keeper[u], groups)
    u, v, sim, kind = u[in_groups], v[in_groups], sim[in_groups], kind[in_groups]
    g = sparse.coo_matrix((2.0 - sim.astype(np.float64), (u, v)), shape=(n + 1, n + 1)).tocsr()
    tree = csgraph.minimum_spanning_tree(g).tocoo()
    tu, tv = tree.row.astype(np.int64), tree.col.astype(np.int64)
    tsim = (2.0 - tree.data).astype(np.float32)
    # recover each tree edge's kind (pairs are unique in (u, v) with u < v)
    key = u * (n + 1) + v
    sorter = np.argsort(key)
    tkey = np.minimum(tu, tv) * (n + 1) + np.maximum(tu, tv)
    tkind = kind[sorter[np.searchsorted(key, tkey, sorter=sorter)]]
    tsort = np.argsort(tkey)
    # hang each group's tree under a virtual root n via its keeper
    roots = groups
    ru = np.concatenate([tu, np.full(roots.size, n, np.int64)])
    rv = np.concatenate([tv, roots])
    forest = sparse.coo_matrix((np.ones(ru.size, np.int8), (ru, rv)), shape=(n + 1, n + 1)).tocsr()
    bfs, pred = csgraph.breadth_first_order(forest, n, directed=False, return_predecessors=True)
    # similarity and kind of the tree edge from each node to its parent
    bott = np.full(n + 1, np.inf, dtype=np.float32)
    bkind = np.full(n + 1, -1, dtype=np.int8)
    nodes = bfs[1:]
    parents = pred[nodes]
    child_nodes = nodes[parents != n]
    par = pred[child_nodes]
    q = np.minimum(child_nodes, par) * (n + 1) + np.maximum(child_nodes, par)
    idx = tsort[np.searchsorted(tkey, q, sorter=tsort)]
    esim = dict(zip(child_nodes.tolist(), zip(tsim[idx].tolist(), tkind[idx].tolist())))
    for node in child_nodes.tolist():  # BFS order: a parent is always done before its children
        p = int(pred[node])
        s, k = esim[node]
        if p != n and bott[p] < s:
            bott[node], bkind[node] = bott[p], bkind[p]
        else:
            bott[node], bkind[node] = s, k
    return bott[targets], bkind[targets].astype(np.int64)


def max_cross_similarity(emb: np.ndarray, config: DedupConfig | None = None) -> float:
    """Highest cosine between two distinct rows (each row's nearest other row, k=2), for the asset check
    "no two curated rows above the dedup threshold". Searches like find_duplicates (exact up to
    ``config.exact_max`` rows, IVF above, so approximate there). nan when there are fewer than two rows."""
    cfg = DedupConfig(k=1) if config is None else DedupConfig(**{**config.to_dict(), "k": 1})
    x = _unit_float32(emb, "emb")
    n = x.shape[0]
    if n < 2:
        return float("nan")
    _set_threads(cfg.threads)
    best = -np.inf
    _, batches = _knn(x, 1, cfg, "max_cross_similarity", None)
    for start, D, I in batches:
        rows = np.arange(start, start + D.shape[0])[:, None]
        other = (I >= 0) & (I != rows)
        if other.any():
            best = max(best, float(D[other].max()))
    return float(min(best, 1.0))
