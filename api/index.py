"""Search over a loaded curated version: faiss indexes over the image embeddings, record lookup, stats.

Why per-category indexes: a category filter must return k hits from that category. Filtering the k global
hits down would return fewer, and a filtered HNSW graph walk (IDSelector) can also come back short when
the category is rare, so each category gets its own index (exact when small, which is the usual case).
Scores are inner products of unit vectors, i.e. cosine similarity.
"""
from __future__ import annotations

import logging
import math
import os
import threading
from dataclasses import dataclass, field
from typing import Any

import faiss
import numpy as np
import polars as pl

from api.settings import IndexConfig
from curation_dagster.core.artifacts import (
    STAGE_COUNTS_KEY, ArtifactError, CuratedVersion, alignment_stats, load_removals,
)
from curation_dagster.core.categories import official_categories

log = logging.getLogger("api")

UNLABELLED = "unlabelled"
_UNLABELLED_CODE = -1  # the per-category index key of records without a class (real codes are positive)


def category_code(category: int | str | None) -> int | None:
    """The index key of a category filter value: a prdtypecode, or "unlabelled"."""
    if category is None:
        return None
    return _UNLABELLED_CODE if category == UNLABELLED else int(category)


_omp = threading.local()


def _omp_threads(n: int) -> None:
    """OpenMP thread counts are per calling thread: set this thread's once (cheap check per query).

    Without it every request thread would use all cores for its single query and 16 concurrent
    requests would oversubscribe a 2-core machine, with OpenMP's spin-waiting making that much worse.
    """
    if getattr(_omp, "n", None) != n:
        faiss.omp_set_num_threads(n)
        _omp.n = n


# What a search hit shows of a record (api.schemas.SearchHit, less score and image_url)
HIT_COLUMNS = ("record_id", "image_file", "designation", "prdtypecode", "category", "alignment_score")

# Largest exact (IndexFlatIP) search run on the event loop: 20,000 x 512 floats is ~1 ms on one core.
LOOP_FLAT_ROWS = 20_000


def ivf_nlist(n: int) -> int:
    """IVF list count: about 4·sqrt(n), at most n/39 so that k-means has enough points per centroid."""
    return int(max(1, min(round(4 * math.sqrt(n)), n // 39, 65536)))


class VectorIndex:
    """Inner-product top-k over unit vectors: exact ``IndexFlatIP`` up to ``exact_max`` rows, HNSW or IVF above."""

    def __init__(self, vectors: np.ndarray, config: IndexConfig, rows: np.ndarray | None = None):
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        n, d = vectors.shape
        self.rows = rows  # maps local positions to corpus rows (None: identity)
        self.ntotal = n
        self.config = config
        _omp_threads(config.build_threads or os.cpu_count() or 1)
        if n <= config.exact_max:
            self.kind = "flat"
            self._index = faiss.IndexFlatIP(d)
        elif config.ann == "ivf":
            self.kind = "ivf"
            nlist = ivf_nlist(n)
            self._index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
            rng = np.random.default_rng(0)
            train = vectors if n <= 50 * nlist else vectors[np.sort(rng.choice(n, 50 * nlist, replace=False))]
            self._index.train(train)
            self.nprobe = min(config.ivf_nprobe, nlist)
        else:
            self.kind = "hnsw"
            self._index = faiss.IndexHNSWFlat(d, config.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            self._index.hnsw.efConstruction = config.hnsw_ef_construction
            self._index.hnsw.efSearch = config.hnsw_ef_search
        if n:
            self._index.add(vectors)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k for each query row: (scores [m, k'], corpus rows [m, k']) best first, k' = min(k, ntotal).

        Approximate indexes may pad with row -1 when they find fewer than k' (callers drop those).
        """
        _omp_threads(self.config.search_threads)
        q = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        k = min(k, self.ntotal)
        if k <= 0:
            return np.zeros((q.shape[0], 0), np.float32), np.zeros((q.shape[0], 0), np.int64)
        if self.kind == "flat":
            scores, pos = self._index.search(q, k)
        else:
            # An approximate search can come back short (few IVF lists probed, HNSW beam too narrow);
            # widen it until every query has k hits, so a caller asking for k gets k.
            effort = max(self.config.hnsw_ef_search, k) if self.kind == "hnsw" else self.nprobe
            limit = self.ntotal if self.kind == "hnsw" else self._index.nlist
            while True:
                if self.kind == "hnsw":
                    params = faiss.SearchParametersHNSW(efSearch=effort)
                else:
                    params = faiss.SearchParametersIVF(nprobe=effort)
                scores, pos = self._index.search(q, k, params=params)
                if (pos >= 0).all() or effort >= limit:
                    break
                effort = min(limit, effort * 4)
        rows = pos if self.rows is None else np.where(pos >= 0, self.rows[np.maximum(pos, 0)], -1)
        return scores, rows


class CorpusIndex:
    """Global index plus one index per category (prdtypecode)."""

    def __init__(self, vectors: np.ndarray, categories: np.ndarray, config: IndexConfig):
        self.config = config
        self.dim = int(vectors.shape[1])
        self.all = VectorIndex(vectors, config)
        self.by_category: dict[int, VectorIndex] = {}
        order = np.argsort(categories, kind="stable")
        cats, starts = np.unique(categories[order], return_index=True)
        bounds = list(starts[1:]) + [len(order)]
        for cat, start, stop in zip(cats.tolist(), starts.tolist(), bounds):
            rows = order[start:stop]
            self.by_category[int(cat)] = VectorIndex(vectors[rows], config, rows=rows.astype(np.int64))

    @property
    def kind(self) -> str:
        return self.all.kind

    def _index_for(self, category: int | str | None) -> "VectorIndex | None":
        return self.all if category is None else self.by_category.get(category_code(category))

    def cheap(self, category: int | str | None = None) -> bool:
        """Whether one search is short enough to run on the server's event loop (~1 ms): approximate (IVF/HNSW
        visit a bounded part of the corpus, unless a short result makes VectorIndex.search widen its probe, which
        is rare for k <= 100), or exact over at most ``LOOP_FLAT_ROWS`` rows. An exact search over more (an
        operator raised CURATION_API_EXACT_MAX) would stall every other request; it goes to a thread."""
        index = self._index_for(category)
        return index is None or index.kind != "flat" or index.ntotal <= LOOP_FLAT_ROWS

    def search(self, query: np.ndarray, k: int, category: int | str | None = None) -> list[tuple[int, float]]:
        """[(corpus row, score)] best first; k hits from ``category`` (a code or "unlabelled") when it has k."""
        index = self._index_for(category)
        if index is None:
            return []
        scores, rows = index.search(query.reshape(1, -1), k)
        return [(int(r), float(s)) for r, s in zip(rows[0], scores[0]) if r >= 0]


@dataclass
class Corpus:
    """A curated version ready to serve: its records, index and precomputed stats. Immutable once built."""

    version: CuratedVersion
    index: CorpusIndex
    stats: dict[str, Any] = field(default_factory=dict)
    _sorted_ids: np.ndarray = field(default=None, repr=False)  # type: ignore[assignment]
    _id_order: np.ndarray = field(default=None, repr=False)  # type: ignore[assignment]
    image_files: frozenset[str] = field(default_factory=frozenset, repr=False)  # what /images may serve
    # The version's removals.parquet (None: written without one), why it could not be read, and its images
    # (removed rows and the rows they duplicate), which /images also serves for the curation browser.
    removals: pl.DataFrame | None = field(default=None, repr=False)
    removals_error: str | None = None
    removal_images: frozenset[str] = field(default_factory=frozenset, repr=False)
    # The fields of a search hit, one Python list per column (see hit_fields), built once per version.
    _hit_columns: dict[str, list] = field(default_factory=dict, repr=False)

    @classmethod
    def build(cls, version: CuratedVersion, config: IndexConfig) -> "Corpus":
        recs = version.records
        index = CorpusIndex(version.image_emb, recs["prdtypecode"].fill_null(_UNLABELLED_CODE).to_numpy(), config)
        ids = recs["record_id"].to_numpy()
        order = np.argsort(ids, kind="stable")
        corpus = cls(version=version, index=index, _sorted_ids=ids[order], _id_order=order,
                     image_files=frozenset(recs["image_file"].to_list()))
        try:  # a review table that cannot be read never stops search: the curation browser says why
            removals = load_removals(version)
            if removals is not None:
                corpus.removal_images = frozenset(
                    f for col in ("image_file", "kept_image_file") if col in removals.columns
                    for f in removals[col].drop_nulls().cast(pl.Utf8).to_list())
            corpus.removals = removals
        except Exception as exc:  # noqa: BLE001 - ArtifactError, or a column polars cannot read as file names
            corpus.removals, corpus.removal_images = None, frozenset()
            corpus.removals_error = str(exc)  # shown by /curation/removals with the paths redacted
            log.warning("curated version %s: removals table not loaded: %s", version.version, exc)
        corpus.stats = corpus._compute_stats()
        names: dict[str, str] = {}  # 27 category names shared, not one string object per row
        corpus._hit_columns = {c: recs[c].to_list() for c in HIT_COLUMNS if c != "category"}
        corpus._hit_columns["category"] = [None if c is None else names.setdefault(c, c)
                                           for c in recs["category"].to_list()]
        return corpus

    @property
    def name(self) -> str:
        return self.version.version

    @property
    def model(self) -> str:
        return self.version.model

    @property
    def count(self) -> int:
        return self.version.count

    def row_of(self, record_id: int) -> int | None:
        i = int(np.searchsorted(self._sorted_ids, record_id))
        if i < len(self._sorted_ids) and self._sorted_ids[i] == record_id:
            return int(self._id_order[i])
        return None

    def unknown_category(self, category: int | str | None) -> str | None:
        """Why a category filter names nothing this service knows (None when it is fine): a code that is neither
        one of the official 27 nor in this version. An official code with no record left answers an empty list."""
        if category is None or category == UNLABELLED:
            return None
        code = int(category)
        # by_category files unlabelled rows under a negative key: -1 must not be an undocumented alias of "unlabelled"
        if code > 0 and (code in self.index.by_category or code in set(official_categories()["prdtypecode"].to_list())):
            return None
        known = ", ".join(f"{c} ({n})" for c, n in sorted(self.stats["categories"].items(), key=lambda kv: int(kv[0])))
        return f"unknown category {code}; known categories: {known}, or \"unlabelled\""

    def hit_fields(self, rows: list[int]) -> list[dict[str, Any]]:
        """The HIT_COLUMNS of the records at corpus rows, in the given order, as plain dicts.

        From per-column Python lists, not a polars gather: on every search, and a polars gather (parallel over
        columns on polars' thread pool) measured 0.1 ms idle but 0.4-0.8 ms per request with the query encoder
        busy on the other cores, on the event loop; the lists take 0.01 ms (about 0.4 KB per record)."""
        cols = self._hit_columns
        return [{c: cols[c][r] for c in HIT_COLUMNS} for r in rows]

    def rows(self, rows: list[int]) -> list[dict[str, Any]]:
        """Records at corpus rows, in the given order, as plain dicts (every column)."""
        if not rows:
            return []
        return self.version.records[rows].to_dicts()

    def _compute_stats(self) -> dict[str, Any]:
        recs = self.version.records
        m = self.version.manifest
        dist = recs.group_by("prdtypecode").len().sort("prdtypecode", nulls_last=True)
        cats = (
            recs.filter(pl.col("category").is_not_null() & pl.col("prdtypecode").is_not_null())
            .group_by("prdtypecode")
            .agg(pl.col("category").first())
            .sort("prdtypecode")
        )
        unlabelled = recs["prdtypecode"].null_count()
        return {
            "num_records": recs.height,
            "labelled": recs.height - unlabelled,
            "unlabelled": unlabelled,
            "label_distribution": {(UNLABELLED if k is None else str(k)): int(v)
                                   for k, v in zip(dist["prdtypecode"], dist["len"])},
            "categories": {str(k): v for k, v in zip(cats["prdtypecode"], cats["category"])},
            "alignment_score_stats": alignment_stats(recs["alignment_score"].to_numpy()),
            "version": self.name,
            "model": self.model,
            "dim": self.version.dim,
            "created_at": m.get("created_at"),
            "run_id": m.get("run_id"),
            "counts": m.get(STAGE_COUNTS_KEY),
            "thresholds": m.get("thresholds"),
            "index": {
                "kind": self.index.kind,
                "exact_max": self.index.config.exact_max,
                "categories": len(self.index.by_category),
                "category_index_kinds": sorted({ix.kind for ix in self.index.by_category.values()}),
            },
        }

    def canary(self, query_vec: np.ndarray) -> None:
        """Sanity checks run before a version is swapped in; raise ValueError when something is off."""
        if query_vec.shape != (self.version.dim,) or not np.isfinite(query_vec).all():
            raise ValueError(f"canary query embedding has shape {query_vec.shape}, expected ({self.version.dim},)")
        if self.count == 0:
            return
        hits = self.index.search(query_vec, min(5, self.count))
        if not hits or not all(math.isfinite(s) for _, s in hits):
            raise ValueError("canary text query returned no finite results")
        # An image embedding must find itself (or an identical copy) first.
        probe = int(self.count // 2)
        top = self.index.search(self.version.image_emb[probe], 1)
        if not top or top[0][1] < 0.99:
            raise ValueError(f"canary self-search failed: row {probe} → {top}")
        code = self.version.records["prdtypecode"][probe]
        cat = UNLABELLED if code is None else int(code)
        in_cat = self.index.search(self.version.image_emb[probe], 3, category=cat)
        codes = self.version.records["prdtypecode"].fill_null(_UNLABELLED_CODE).to_numpy()
        if not in_cat or any(codes[r] != category_code(cat) for r, _ in in_cat):
            raise ValueError(f"canary category search for {cat} returned rows from other categories")
