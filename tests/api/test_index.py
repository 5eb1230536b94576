"""faiss search used by the API, and the text micro-batcher, on synthetic data with known answers."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from api.index import CorpusIndex, VectorIndex
from api.service import TextBatcher, same_model
from api.settings import IndexConfig as _IndexConfig


def IndexConfig(**kw) -> _IndexConfig:  # noqa: N802 - one build thread: small builds on 2 shared cores
    return _IndexConfig(**{"build_threads": 1, **kw})


def clustered(n: int, d: int = 32, centers: int = 50, noise: float = 0.3, seed: int = 0):
    """Unit vectors around random centres (embeddings have structure; uniform random ones have none)."""
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centers, d))
    x = c[rng.integers(0, centers, n)] + noise * rng.standard_normal((n, d))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32)


def brute(x: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-(x @ q), kind="stable")[:k]


def test_flat_index_is_exact():
    x = clustered(2000)
    q = clustered(20, seed=1)
    ix = VectorIndex(x, IndexConfig(exact_max=10_000))
    assert ix.kind == "flat"
    scores, rows = ix.search(q, 10)
    for i in range(len(q)):
        np.testing.assert_array_equal(np.sort(rows[i]), np.sort(brute(x, q[i], 10)))
        np.testing.assert_allclose(scores[i], x[rows[i]] @ q[i], rtol=1e-5, atol=1e-5)
        assert (np.diff(scores[i]) <= 1e-6).all()  # best first


def test_hnsw_above_exact_max_with_high_recall():
    x = clustered(5000)
    q = clustered(50, seed=2)
    ix = VectorIndex(x, IndexConfig(exact_max=1000, ann="hnsw"))
    assert ix.kind == "hnsw"
    _, rows = ix.search(q, 10)
    recall = np.mean([len(set(rows[i]) & set(brute(x, q[i], 10))) / 10 for i in range(len(q))])
    assert recall >= 0.95


def test_k_larger_than_corpus_returns_everything_once():
    x = clustered(7)
    for cfg in (IndexConfig(exact_max=100), IndexConfig(exact_max=0)):
        _, rows = VectorIndex(x, cfg).search(x[0], 50)
        assert sorted(rows[0].tolist()) == list(range(7))
    empty = VectorIndex(x[:0], IndexConfig())
    assert empty.search(x[0], 5)[1].shape == (1, 0)


def test_ivf_above_exact_max_with_high_recall():
    x = clustered(5000)
    q = clustered(50, seed=2)
    ix = VectorIndex(x, IndexConfig(exact_max=1000, ann="ivf", ivf_nprobe=8))
    assert ix.kind == "ivf" and ix._index.nlist == 128
    _, rows = ix.search(q, 10)
    recall = np.mean([len(set(rows[i]) & set(brute(x, q[i], 10))) / 10 for i in range(len(q))])
    assert recall >= 0.9


@pytest.mark.parametrize("ann", ["hnsw", "ivf"])
def test_approximate_search_never_comes_back_short(ann):
    """One probed IVF list (or a 1-wide beam) holds fewer than k: the search widens until it has k."""
    x = clustered(4000, centers=200)
    ix = VectorIndex(x, IndexConfig(exact_max=0, ann=ann, ivf_nprobe=1, hnsw_ef_search=1))
    _, rows = ix.search(clustered(5, seed=9), 300)
    assert rows.shape == (5, 300) and (rows >= 0).all()
    assert all(len(set(r.tolist())) == 300 for r in rows)


def test_index_config_rejects_unknown_ann():
    with pytest.raises(ValueError, match="CURATION_API_ANN"):
        _IndexConfig(ann="lsh")


@pytest.mark.parametrize("exact_max, ann", [(100_000, "hnsw"), (0, "hnsw"), (0, "ivf")])  # all flat; all approximate
def test_category_filter_returns_k_from_that_category(exact_max, ann):
    n = 3000
    x = clustered(n, seed=3)
    rng = np.random.default_rng(4)
    cats = rng.choice([10, 40, 2583], size=n, p=[0.9, 0.09, 0.01]).astype(np.int64)  # 2583 is rare (~30 rows)
    ix = CorpusIndex(x, cats, IndexConfig(exact_max=exact_max, ann=ann, ivf_nprobe=4))
    q = clustered(1, seed=5)[0]
    for cat in (10, 40, 2583):
        hits = ix.search(q, 20, category=cat)
        rows = [r for r, _ in hits]
        assert len(rows) == 20 and len(set(rows)) == 20
        assert all(cats[r] == cat for r in rows)
        in_cat = np.flatnonzero(cats == cat)
        truth = in_cat[brute(x[in_cat], q, 20)]
        assert len(set(rows) & set(truth.tolist())) >= 19
        assert all(abs(s - float(x[r] @ q)) < 1e-4 for r, s in hits)
    # A category smaller than k: all of it, nothing from elsewhere.
    small = int((cats == 2583).sum())
    assert len(ix.search(q, 100, category=2583)) == small
    assert ix.search(q, 5, category=999) == []
    # Unfiltered: global top-k.
    assert [r for r, _ in ix.search(q, 5)] == brute(x, q, 5).tolist()


def test_text_batcher_batches_concurrent_queries_and_keeps_order():
    calls: list[int] = []
    release = threading.Event()

    def encode(texts):
        calls.append(len(texts))
        if len(calls) == 1:
            release.wait(5)  # hold the first batch so the others queue up behind it
        return np.array([[float(t)] for t in texts], np.float32)

    b = TextBatcher(encode, max_batch=8)
    results: dict[int, float] = {}

    def ask(i):
        results[i] = float(b.encode(str(i))[0])

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(20)]
    threads[0].start()
    time.sleep(0.2)
    for t in threads[1:]:
        t.start()
    time.sleep(0.2)
    release.set()
    for t in threads:
        t.join(10)
    b.close()
    assert results == {i: float(i) for i in range(20)}  # every caller got its own vector
    assert sum(calls) == 20 and max(calls) == 8 and len(calls) <= 4  # batched, capped at max_batch


def test_text_batcher_async_submit_answers_on_the_event_loop():
    import asyncio

    b = TextBatcher(lambda texts: np.array([[float(len(t))] for t in texts], np.float32), workers=2)

    async def many():
        return await asyncio.gather(*(b.encode_async("x" * i) for i in range(1, 30)))

    got = asyncio.run(many())
    b.close()
    assert [float(v[0]) for v in got] == [float(i) for i in range(1, 30)]


def _held_batcher():
    """A one-worker batcher whose worker is busy with the query "first" until ``hold`` is set; vectors = [len]."""
    seen: list[str] = []
    hold = threading.Event()
    inside = threading.Event()

    def encode(texts):
        seen.extend(texts)
        if texts == ["first"]:
            inside.set()
            hold.wait(5)
        return np.array([[float(len(t))] for t in texts], np.float32)

    b = TextBatcher(encode, max_batch=8, workers=1)
    first = b.submit("first")
    assert inside.wait(5)
    return b, first, hold, seen


def test_text_batcher_skips_a_query_whose_caller_gave_up():
    """An async request cancelled while its query waits (client gone, timeout) cancels its future; the batch it
    would have joined still answers everybody else, and the abandoned text is not encoded."""
    import asyncio

    b, first, hold, seen = _held_batcher()

    async def scenario():
        gone = asyncio.ensure_future(b.encode_async("abandoned"))
        await asyncio.sleep(0.05)  # queued behind "first"
        stay = asyncio.ensure_future(b.encode_async("kept!"))
        await asyncio.sleep(0.05)
        gone.cancel()
        await asyncio.sleep(0.05)
        hold.set()
        return await asyncio.wait_for(stay, 5), gone

    kept, gone = asyncio.run(scenario())
    assert float(first.result(5)[0]) == 5.0
    assert float(kept[0]) == 5.0
    assert gone.cancelled()
    assert "abandoned" not in seen
    b.close()


def test_text_batcher_propagates_errors_and_survives():
    def encode(texts):
        if "bad" in texts:
            raise RuntimeError("model exploded")
        return np.ones((len(texts), 2), np.float32)

    b = TextBatcher(encode)
    with pytest.raises(RuntimeError, match="model exploded"):
        b.encode("bad")
    assert b.encode("good").shape == (2,)
    b.close()


def test_same_model(tmp_path):
    assert same_model("tiny-random", " tiny-random ")
    assert not same_model("tiny-random", "openai/clip-vit-base-patch32")
    (tmp_path / "m").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "m")
    assert same_model(str(tmp_path / "m"), str(tmp_path / "link"))
    assert not same_model(str(tmp_path / "m"), str(tmp_path))


def test_faiss_threads_bounded_in_every_request_thread():
    """OpenMP thread counts are per thread: a search from a fresh (threadpool) thread must still be bounded."""
    import faiss

    ix = VectorIndex(clustered(100), IndexConfig(search_threads=1, build_threads=2))
    seen = []

    def worker():
        ix.search(clustered(1, seed=3), 5)
        seen.append(faiss.omp_get_max_threads())

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert seen == [1]


def test_text_batcher_closed_under_load_still_answers_every_query():
    """A model change closes the old batcher while requests holding the old snapshot still submit to it: a query
    queued behind the stop signal, or submitted after close, is answered (by the old model), not left to time out."""
    b, first, hold, _ = _held_batcher()
    closer = threading.Thread(target=b.close)
    closer.start()
    deadline = time.time() + 5
    while not b._closed and time.time() < deadline:
        time.sleep(0.01)
    behind = b.submit("behind the stop signal")  # queued after the worker's stop signal
    hold.set()
    closer.join(15)
    assert not closer.is_alive()
    assert float(first.result(5)[0]) == 5.0
    assert float(behind.result(5)[0]) == float(len("behind the stop signal"))
    assert float(b.encode("after close", timeout=5)[0]) == float(len("after close"))


def test_closed_batcher_never_encodes_on_the_event_loop():
    import asyncio

    where: list[str] = []

    def encode(texts):
        where.append(threading.current_thread().name)
        return np.ones((len(texts), 1), np.float32)

    b = TextBatcher(encode, workers=1)
    b.close()
    got = asyncio.run(b.encode_async("late"))  # the loop runs on this (main) thread
    assert float(got[0]) == 1.0
    assert where and threading.main_thread().name not in where


def test_hit_fields_are_the_records_own_values(sample_artifacts_dir):
    """Search hits read per-column lists built at load (no polars gather per request): the same values in the
    same order as the records, for the real sample, and null fields stay null."""
    import polars as pl

    from api.index import HIT_COLUMNS, Corpus
    from curation_dagster.core.artifacts import load_version

    version = load_version(sample_artifacts_dir)
    corpus = Corpus.build(version, _IndexConfig(build_threads=1))
    rows = [5, 0, corpus.count - 1, 17, 5]
    expected = [{c: rec[c] for c in HIT_COLUMNS} for rec in corpus.rows(rows)]
    assert corpus.hit_fields(rows) == expected and len({e["record_id"] for e in expected}) == 4
    assert corpus.hit_fields([]) == []
    unlabelled = version.records.with_columns(  # a Kaggle test row: no prdtypecode, no category
        pl.when(pl.int_range(pl.len()) == 3).then(None).otherwise(pl.col(c)).alias(c) for c in ("prdtypecode", "category"))
    object.__setattr__(version, "records", unlabelled)
    hit = Corpus.build(version, _IndexConfig(build_threads=1)).hit_fields([3])[0]
    assert hit["prdtypecode"] is None and hit["category"] is None
    assert hit["designation"] == unlabelled["designation"][3] and hit["record_id"] == unlabelled["record_id"][3]
