"""Concurrent text encoding (issue 9, item 1): the fast tokenizer is shared by the service's encode workers.

A Hugging Face fast tokenizer keeps its padding/truncation settings in the Rust backend and each call with
padding/truncation arguments rewrites them first: two threads tokenizing at once could get unpadded, ragged
batches ("expected sequence of length 7 ... (got 10)") → 500s under 12-16 concurrent clients.
"""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from api_helpers import make_settings
from fastapi.testclient import TestClient

from api.main import create_app

# Texts of many different token lengths, so that padded and unpadded batches differ.
TEXTS = [("mot " * (i % 13 + 1)) + f"numéro {i} lampe" + " étanche" * (i % 5) for i in range(64)]


@pytest.fixture(scope="module")
def fp32_encoder():
    from curation_dagster.core.encoder import ClipEncoder

    # fp32: bf16 autocast (chosen by timing on some CPUs) would make batch composition change the last digits.
    return ClipEncoder.load("tiny-random", "cpu", precision="fp32")


def test_encode_texts_from_many_threads(fp32_encoder):
    enc = fp32_encoder
    reference = dict(zip(TEXTS, enc.encode_texts(TEXTS)))
    threads, rounds = 16, 50
    barrier = threading.Barrier(threads)
    errors: list[str] = []
    mismatches: list[str] = []

    def work(k: int) -> None:
        barrier.wait()
        for r in range(rounds):
            batch = [TEXTS[(k * 7 + r * 3 + j) % len(TEXTS)] for j in range(1 + (k + r) % 9)]
            try:
                out = enc.encode_texts(batch)
            except Exception as exc:  # noqa: BLE001 - collected, asserted below
                errors.append(f"{type(exc).__name__}: {str(exc)[:120]}")
                continue
            mismatches.extend(t for t, v in zip(batch, out) if not np.allclose(v, reference[t], atol=1e-5))

    pool = [threading.Thread(target=work, args=(k,)) for k in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(60)
    assert not any(t.is_alive() for t in pool), "a concurrent call never returned (deadlock)"
    assert not errors, f"{len(errors)} of {threads * rounds} concurrent calls failed, e.g. {errors[:2]}"
    assert not mismatches


def test_concurrent_search_through_the_app(sample_artifacts_dir, fp32_encoder):
    """16 concurrent clients, several encode workers over one encoder: every answer 200 and equal to the sequential one."""
    settings = make_settings(sample_artifacts_dir, encode_workers=4, max_batch=4, torch_threads=1)
    app = create_app(settings, encoder_loader=lambda model, device: fp32_encoder)
    queries = [TEXTS[i % len(TEXTS)] for i in range(96)]
    with TestClient(app) as client:
        assert len(app.state.service._batcher._threads) == 4  # several workers: throughput kept, not one worker
        alone = {q: [h["record_id"] for h in client.post("/search", json={"query": q, "top_k": 3}).json()]
                 for q in TEXTS}
        with ThreadPoolExecutor(16) as pool:
            results = list(pool.map(lambda q: (q, client.post("/search", json={"query": q, "top_k": 3})), queries))
    bad = [(q, r.status_code, r.text[:200]) for q, r in results if r.status_code != 200]
    assert not bad, f"{len(bad)} of {len(results)} failed, e.g. {bad[:2]}"
    assert all([h["record_id"] for h in r.json()] == alone[q] for q, r in results)
