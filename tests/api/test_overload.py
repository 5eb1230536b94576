"""An overloaded or misconfigured server degrades cleanly: load shedding with 503 + Retry-After instead of a
hung or 500 request, no long exact search on the event loop, and the frozen start-up heap kept per process."""
from __future__ import annotations

import asyncio
import gc
import threading
import time
from concurrent.futures import Future

import numpy as np
import pytest
from api_helpers import HashEncoder, build_sample_artifact, make_settings
from fastapi.testclient import TestClient

import api.index
from api.index import VectorIndex
from api.main import create_app
from api.service import BusyError, TextBatcher


class GatedEncoder(HashEncoder):
    """HashEncoder whose text forwards wait while ``gate`` is closed (a slow or stuck model under load)."""

    def __init__(self):
        super().__init__()
        self.gate = threading.Event()
        self.gate.set()
        self.inside = threading.Event()

    def encode_texts(self, texts, batch_size: int = 256, progress=None) -> np.ndarray:
        if not self.gate.is_set():
            self.inside.set()
            self.gate.wait(10)
        return super().encode_texts(texts, batch_size, progress)


@pytest.fixture(scope="module")
def small_artifacts(tmp_path_factory):
    d = tmp_path_factory.mktemp("overload")
    build_sample_artifact(d, HashEncoder(), rows=60)
    return d


def test_batcher_sheds_load_past_max_pending_and_turns_a_timeout_into_busy():
    hold = threading.Event()
    inside = threading.Event()

    def encode(texts):
        inside.set()
        hold.wait(10)
        return np.ones((len(texts), 2), np.float32)

    b = TextBatcher(encode, max_batch=8, workers=1, max_pending=2, timeout=3.0)
    first = b.submit("first")  # taken by the worker, held
    assert inside.wait(5)
    queued = [b.submit("a"), b.submit("b")]
    with pytest.raises(BusyError, match="2 queries are already waiting"):
        b.submit("c")
    t0 = time.perf_counter()
    with pytest.raises(BusyError, match="already waiting"):
        asyncio.run(b.encode_async("late"))  # refused at once: the queue is full
    assert time.perf_counter() - t0 < 2.0  # refused, not after the 3 s deadline
    hold.set()
    assert first.result(5).shape == (2,) and all(f.result(5).shape == (2,) for f in queued)
    b.close()


def test_batcher_wait_past_the_deadline_is_busy_and_the_query_is_not_encoded_later():
    hold = threading.Event()
    inside = threading.Event()
    seen: list[str] = []

    def encode(texts):
        seen.extend(texts)
        inside.set()
        hold.wait(10)
        return np.ones((len(texts), 2), np.float32)

    b = TextBatcher(encode, max_batch=8, workers=1, timeout=0.2)
    b.submit("first")
    assert inside.wait(5)  # the worker is busy with "first": the waiters below queue behind it
    with pytest.raises(BusyError, match="within 0.2 s"):
        b.encode("sync waiter")
    with pytest.raises(BusyError, match="within 0.2 s"):
        asyncio.run(b.encode_async("async waiter"))
    hold.set()
    assert b.encode("after", timeout=5).shape == (2,)
    assert "sync waiter" not in seen and "async waiter" not in seen  # abandoned while queued: skipped
    b.close()


def test_a_query_finished_at_the_deadline_is_answered_not_failed():
    """The wait times out while the worker is setting the result: the vector is there, so it is returned (it was
    a raw TimeoutError, a 500, for ~5% of such queries). Queued: withdrawn, BusyError. Running: BusyError."""
    done: Future = Future()
    done.set_running_or_notify_cancel()
    done.set_result(np.ones(2, np.float32))
    late = TextBatcher(lambda texts: np.ones((len(texts), 2), np.float32))._late
    assert late(done, 1.0).shape == (2,)
    queued: Future = Future()
    with pytest.raises(BusyError):
        late(queued, 1.0)
    assert queued.cancelled()  # its batch will skip it
    running: Future = Future()
    running.set_running_or_notify_cancel()
    with pytest.raises(BusyError):
        late(running, 1.0)
    failed: Future = Future()
    failed.set_running_or_notify_cancel()
    failed.set_exception(RuntimeError("model exploded"))
    with pytest.raises(RuntimeError, match="model exploded"):  # a model error stays a model error
        late(failed, 1.0)

    def encode(texts):  # as long as the deadline: results land right around it
        time.sleep(0.02)
        return np.ones((len(texts), 2), np.float32)

    b = TextBatcher(encode, max_batch=1, workers=1, timeout=0.02)
    outcomes = {"ok": 0, "busy": 0}
    for i in range(150):
        try:
            asyncio.run(b.encode_async(f"q{i}"))
            outcomes["ok"] += 1
        except BusyError:
            outcomes["busy"] += 1
        # anything else (a bare TimeoutError) fails the test
    b.close()
    assert sum(outcomes.values()) == 150


def test_search_under_overload_answers_503_with_retry_after_then_recovers(small_artifacts):
    enc = GatedEncoder()
    app = create_app(make_settings(small_artifacts, max_pending_queries=2, query_timeout_s=2.0, max_batch=1),
                     encoder_loader=lambda m, d: enc)
    with TestClient(app) as client:
        assert client.post("/search", json={"query": "warm"}).status_code == 200
        enc.gate.clear()
        results: dict[str, object] = {}

        def ask(q):
            r = client.post("/search", json={"query": q})
            results[q] = (r.status_code, r.headers.get("retry-after"), r.json())

        held = threading.Thread(target=ask, args=("held by the model",))
        held.start()
        assert enc.inside.wait(5)
        waiting = [threading.Thread(target=ask, args=(f"queued {i}",)) for i in range(2)]
        for t in waiting:
            t.start()
        deadline = time.time() + 5
        batcher = app.state.service.snapshot().batcher
        while batcher._queue.qsize() < 2 and time.time() < deadline:
            time.sleep(0.01)
        t0 = time.perf_counter()
        shed = client.post("/search", json={"query": "one too many"})
        assert time.perf_counter() - t0 < 1.5  # refused at once, not after the 2 s deadline
        assert shed.status_code == 503 and shed.headers["retry-after"] == "1"
        assert "already waiting" in shed.json()["detail"]
        for t in [held, *waiting]:
            t.join(10)
        # Everybody who waited past the 2 s deadline got a 503 saying so, not a 500 or a hang.
        assert {q: r[0] for q, r in results.items()} == {"held by the model": 503, "queued 0": 503, "queued 1": 503}
        assert all(r[1] == "1" and "within 2 s" in r[2]["detail"] for r in results.values())
        enc.gate.set()
        # the withdrawn queries stay counted until a worker skips them (qsize is approximate by design): on a busy
        # machine the next query could otherwise still be shed
        deadline = time.time() + 10
        while batcher._queue.qsize() and time.time() < deadline:
            time.sleep(0.01)
        ok = client.post("/search", json={"query": "after the storm"})
        assert ok.status_code == 200 and len(ok.json()) == 5
        queue = client.get("/stats").json()["query_queue"]  # what an operator sees
        assert queue["shed"] == 1 and queue["timed_out"] == 3 and queue["max_pending"] == 2
        assert queue["timeout_s"] == 2.0 and queue["encoded"] >= 2 and queue["pending"] == 0


def _search_threads(monkeypatch) -> list[bool]:
    """Records, for each VectorIndex.search, whether it ran on a thread with a running event loop."""
    on_loop: list[bool] = []
    real = VectorIndex.search

    def spy(self, queries, k):
        try:
            asyncio.get_running_loop()
            on_loop.append(True)
        except RuntimeError:
            on_loop.append(False)
        return real(self, queries, k)

    monkeypatch.setattr(VectorIndex, "search", spy)
    return on_loop


def test_a_large_exact_search_runs_off_the_event_loop(small_artifacts, monkeypatch):
    """An operator who raises CURATION_API_EXACT_MAX gets exact search over a big corpus without every other
    request waiting behind it on the event loop; small exact and approximate searches stay on the loop."""
    on_loop = _search_threads(monkeypatch)
    app = create_app(make_settings(small_artifacts), encoder_loader=lambda m, d: HashEncoder())
    with TestClient(app) as client:
        del on_loop[:]  # start-up's canary searches
        assert client.post("/search", json={"query": "lampe"}).status_code == 200
        assert on_loop == [True]  # 60 rows, exact: cheap
        monkeypatch.setattr(api.index, "LOOP_FLAT_ROWS", 10)  # now 60 exact rows count as a long search
        r = client.post("/search", json={"query": "lampe", "category": None})
        assert r.status_code == 200 and len(r.json()) == 5
        assert on_loop[1:] == [False]


def test_two_apps_in_one_process_keep_the_heap_frozen_until_the_last_stops(small_artifacts):
    gc.unfreeze()
    first = create_app(make_settings(small_artifacts), encoder_loader=lambda m, d: HashEncoder())
    second = create_app(make_settings(small_artifacts), encoder_loader=lambda m, d: HashEncoder())
    with TestClient(second) as c2:
        with TestClient(first) as c1:
            assert c1.get("/healthz").status_code == 200
        assert gc.get_freeze_count() > 1000  # the first app stopped; the second still serves, frozen
        assert c2.get("/healthz").status_code == 200
    assert gc.get_freeze_count() == 0
