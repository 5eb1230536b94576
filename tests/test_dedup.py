"""Deduplication on synthetic embeddings with planted groups whose answers are known exactly."""
from __future__ import annotations

import numpy as np
import pytest

from curation_dagster.core.dedup import DedupConfig, DedupResult, find_duplicates, max_cross_similarity

THR = 0.95
EXACT = DedupConfig(image_threshold=THR, text_threshold=None, use_sha256=False)
# forced partitioned path: few cells and fewer probes than cells, so cell boundaries really matter
PARTITIONED = DedupConfig(image_threshold=THR, text_threshold=None, use_sha256=False, exact_max=0, nlist=16,
                          nprobe=4)


def unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def at_cosine(v: np.ndarray, c: float, rng: np.random.Generator, also_orthogonal_to: np.ndarray | None = None):
    """Unit vector at exactly cosine c to unit v: c*v + sqrt(1-c^2)*u, u ⟂ v (and ⟂ another vector if given)."""
    u = rng.standard_normal(v.shape[0])
    basis = [v] if also_orthogonal_to is None else [v, also_orthogonal_to]
    q, _ = np.linalg.qr(np.stack(basis, axis=1))
    u -= q @ (q.T @ u)
    u /= np.linalg.norm(u)
    return c * v + np.sqrt(1.0 - c * c) * u


def planted(d: int = 128, n: int = 1200, seed: int = 0):
    """Background of random unit vectors (pairwise cosine ~N(0, 1/d)) plus planted groups:

    rows 10, 20, 30: exact copies;  40 ~ 50 at cosine 0.97;
    chain 60 ~(0.97)~ 70 ~(0.955)~ 80, with cos(60, 80) = 0.97 * 0.955 = 0.92635 < THR (joined only through 70);
    90, 100 at 0.949: just under the threshold, must stay apart.
    """
    rng = np.random.default_rng(seed)
    x = unit(rng, n, d)
    x[20] = x[10]
    x[30] = x[10]
    x[50] = at_cosine(x[40], 0.97, rng)
    x[70] = at_cosine(x[60], 0.97, rng)
    x[80] = at_cosine(x[70], 0.955, rng, also_orthogonal_to=x[60])
    x[100] = at_cosine(x[90], 0.949, rng)
    x = x.astype(np.float32)
    # record ids in reverse row order, so "lowest record_id" differs from "lowest row"
    rid = (np.arange(n)[::-1] * 3 + 7).astype(np.int64)
    score = np.full(n, 0.3)
    score[[10, 20, 30]] = [0.2, 0.5, 0.5]  # 20 and 30 tie -> lowest record_id -> row 30
    score[[40, 50]] = [0.3, 0.1]  # -> 40
    score[[60, 70, 80]] = [0.1, 0.2, 0.4]  # -> 80; 60 reaches it only through 70
    return x, rid, score


def assert_planted_answer(res: DedupResult, rid: np.ndarray) -> None:
    n = rid.size
    removed = np.flatnonzero(~res.keep)
    np.testing.assert_array_equal(removed, [10, 20, 50, 60, 70])
    expect_of = {10: 30, 20: 30, 50: 40, 60: 80, 70: 80}
    for r, k in expect_of.items():
        assert res.duplicate_of[r] == rid[k]
        assert res.dup_group[r] == rid[k] and res.dup_group[k] == rid[k]
        assert res.reason[r] == "image"
    np.testing.assert_allclose(res.similarity[[10, 20]], 1.0, atol=1e-5)
    np.testing.assert_allclose(res.similarity[50], 0.97, atol=1e-5)
    np.testing.assert_allclose(res.similarity[70], 0.955, atol=1e-5)  # direct neighbour of the kept row 80
    # 60 is no neighbour of 80: path 60-(0.97)-70-(0.955)-80, its weakest link is 0.955 (not 60's own edge)
    np.testing.assert_allclose(res.similarity[60], 0.955, atol=1e-5)
    kept = np.flatnonzero(res.keep)
    assert (res.duplicate_of[kept] == -1).all() and np.isnan(res.similarity[kept]).all()
    assert (res.reason[kept] == "").all()
    others = np.setdiff1d(np.arange(n), [10, 20, 30, 40, 50, 60, 70, 80])
    np.testing.assert_array_equal(res.dup_group[others], rid[others])  # incl. 90 and 100 (0.949): singletons
    # no false edges at all: 3 (copies) + 1 (near pair) + 2 (chain links); 60-80 (0.926) is no edge
    assert res.n_edges == {"image": 6, "text": 0, "sha256": 0}
    assert res.keep.dtype == bool and res.dup_group.dtype == np.int64 and res.duplicate_of.dtype == np.int64
    assert res.similarity.dtype == np.float32


def test_planted_setup_is_what_it_claims():
    x, _, _ = planted()
    assert x[60] @ x[80] == pytest.approx(0.97 * 0.955, abs=1e-5)
    assert x[90] @ x[100] == pytest.approx(0.949, abs=1e-5)
    g = x @ x.T
    near = [(10, 20), (10, 30), (20, 30), (40, 50), (60, 70), (70, 80), (60, 80), (90, 100)]
    for i, j in near:
        g[i, j] = g[j, i] = 0
    np.fill_diagonal(g, 0)
    assert g.max() < 0.7  # everything else is background


@pytest.mark.parametrize("config", [EXACT, PARTITIONED], ids=["exact", "partitioned"])
def test_planted_groups(config):
    x, rid, score = planted()
    res = find_duplicates(x, None, None, score, rid, config)
    assert res.search["image"]["method"] == ("exact" if config is EXACT else "ivf")
    assert_planted_answer(res, rid)


def test_partitioned_fallback_for_dimensions_pq_cannot_split():
    x, rid, score = planted(d=72)
    res = find_duplicates(x, None, None, score, rid, PARTITIONED)
    assert res.search["image"]["index"] == "IVF16,Flat" and res.search["image"]["refine"] is False
    assert_planted_answer(res, rid)


def test_partitioned_recall_on_many_groups_across_cells():
    """200 near-duplicate pairs at 0.955-0.99 spread over every cell: all found, nothing else merged."""
    rng = np.random.default_rng(7)
    n, d = 3000, 64
    x = unit(rng, n, d)
    a = rng.choice(n, size=400, replace=False)
    for i, j in zip(a[:200], a[200:]):
        x[j] = at_cosine(x[i], rng.uniform(0.955, 0.99), rng)
    x = x.astype(np.float32)
    rid = np.arange(n, dtype=np.int64)
    cfg = DedupConfig(image_threshold=THR, text_threshold=None, use_sha256=False, exact_max=0, nlist=32, nprobe=4)
    res = find_duplicates(x, None, None, None, rid, cfg)
    assert res.n_edges["image"] == 200
    np.testing.assert_array_equal(res.dup_group[a[200:]], res.dup_group[a[:200]])
    assert res.n_removed == 200 and res.n_groups == 200


@pytest.mark.parametrize("config", [EXACT, PARTITIONED], ids=["exact", "partitioned"])
def test_group_larger_than_k_stays_one_group(config):
    """60 identical vectors (a placeholder image) with k=4: still one group, one survivor."""
    rng = np.random.default_rng(3)
    x = unit(rng, 1000, 64).astype(np.float32)
    copies = np.arange(100, 1000, 15)[:60]
    x[copies] = x[copies[0]]
    rid = np.arange(1000, dtype=np.int64)
    score = np.zeros(1000)
    score[copies[17]] = 1.0
    res = find_duplicates(x, None, None, score, rid, DedupConfig(**{**config.to_dict(), "k": 4}))
    np.testing.assert_array_equal(np.flatnonzero(~res.keep), np.setdiff1d(copies, [copies[17]]))
    assert (res.dup_group[copies] == copies[17]).all()


def test_text_modality_and_its_own_threshold():
    rng = np.random.default_rng(11)
    n = 300
    img = unit(rng, n, 64).astype(np.float32)
    txt = unit(rng, n, 48)
    txt[5] = at_cosine(txt[4], 0.98, rng)  # same listing text, different photos
    txt[9] = at_cosine(txt[8], 0.965, rng)  # under text_threshold 0.97
    rid = np.arange(n, dtype=np.int64) + 100
    res = find_duplicates(img, txt.astype(np.float32), None, None, rid,
                          DedupConfig(image_threshold=0.95, text_threshold=0.97))
    np.testing.assert_array_equal(np.flatnonzero(~res.keep), [5])
    assert res.reason[5] == "text" and res.duplicate_of[5] == 104
    assert res.similarity[5] == pytest.approx(0.98, abs=1e-5)
    assert res.n_edges == {"image": 0, "text": 1, "sha256": 0}
    # disabling the text modality removes that evidence
    res_off = find_duplicates(img, txt.astype(np.float32), None, None, rid, DedupConfig(text_threshold=None))
    assert res_off.keep.all()


def test_sha256_links_dissimilar_embeddings_and_ignores_missing_hashes():
    rng = np.random.default_rng(12)
    n = 50
    img = unit(rng, n, 32).astype(np.float32)
    sha = [f"{i:064x}" for i in range(n)]
    sha[3] = sha[7] = "ab" * 32
    sha[8] = ("AB" * 32) + " "  # same hash, other case / whitespace
    sha[10] = sha[11] = ""  # missing hashes must not link to each other
    sha[12] = sha[13] = None
    score = np.zeros(n)
    score[7] = 0.9
    res = find_duplicates(img, None, sha, score, np.arange(n, dtype=np.int64))
    np.testing.assert_array_equal(np.flatnonzero(~res.keep), [3, 8])
    assert (res.duplicate_of[[3, 8]] == 7).all()
    assert list(res.reason[[3, 8]]) == ["sha256", "sha256"] and (res.similarity[[3, 8]] == 1.0).all()
    assert img[3] @ img[7] < 0.5
    assert res.n_edges["sha256"] == 2
    # sha256 alone (embeddings disabled) is enough
    res2 = find_duplicates(None, None, sha, score, np.arange(n, dtype=np.int64),
                           DedupConfig(image_threshold=None, text_threshold=None))
    np.testing.assert_array_equal(res2.keep, res.keep)


def test_sha256_wins_as_reason_over_image_when_both_link():
    rng = np.random.default_rng(13)
    img = unit(rng, 20, 32).astype(np.float32)
    img[2] = img[1]
    sha = [str(i) for i in range(20)]
    sha[2] = sha[1]
    res = find_duplicates(img, None, sha, None, np.arange(20, dtype=np.int64))
    assert res.reason[2] == "sha256" and res.duplicate_of[2] == 1
    assert res.n_edges == {"image": 1, "text": 0, "sha256": 1}


def test_mixed_evidence_chain_reports_the_weakest_link():
    """0 ~image(0.96)~ 1 ~text(0.99)~ 2, with 0 and 2 unrelated in both modalities; 2 is kept."""
    rng = np.random.default_rng(14)
    img = unit(rng, 100, 64)
    txt = unit(rng, 100, 64)
    img[1] = at_cosine(img[0], 0.96, rng)
    txt[2] = at_cosine(txt[1], 0.99, rng)
    score = np.zeros(100)
    score[2] = 1.0
    res = find_duplicates(img.astype(np.float32), txt.astype(np.float32), None, score, np.arange(100))
    np.testing.assert_array_equal(np.flatnonzero(~res.keep), [0, 1])
    assert res.reason[1] == "text" and res.similarity[1] == pytest.approx(0.99, abs=1e-5)
    assert res.reason[0] == "image" and res.similarity[0] == pytest.approx(0.96, abs=1e-5)  # via 1, weakest link


def test_unnormalised_input_gives_the_same_answer_and_is_not_modified():
    x, rid, score = planted(d=64, n=400)
    scaled = x * np.random.default_rng(1).uniform(0.5, 4.0, size=(400, 1)).astype(np.float32)
    before = scaled.copy()
    res = find_duplicates(scaled.astype(np.float64), None, None, score, rid, EXACT)
    assert_planted_answer(res, rid)
    np.testing.assert_array_equal(scaled, before)


def test_alignment_none_keeps_lowest_record_id():
    x, rid, _ = planted(d=64, n=400)
    res = find_duplicates(x, None, None, None, rid, EXACT)
    # reversed record ids: the highest row of each group has the lowest record_id
    assert res.keep[[30, 50, 80]].all() and not res.keep[[10, 20, 40, 60, 70]].any()


def test_progress_is_reported():
    x, rid, _ = planted(d=64, n=400)
    calls = []
    find_duplicates(x, None, None, None, rid, DedupConfig(text_threshold=None, batch_size=128),
                    progress=lambda stage, done, total: calls.append((stage, done, total)))
    assert [c[1] for c in calls if c[0] == "dedup image"] == [128, 256, 384, 400]


def test_empty_and_single_row():
    res = find_duplicates(np.zeros((0, 8), np.float32), None, None, None, np.zeros(0, np.int64))
    assert res.keep.shape == (0,)
    one = find_duplicates(np.ones((1, 8), np.float32), None, ["x"], None, np.array([5]))
    assert one.keep.tolist() == [True] and one.dup_group.tolist() == [5]


@pytest.mark.parametrize(
    "args, match",
    [
        (dict(image_emb=np.full((3, 4), np.nan)), "non-finite"),
        (dict(image_emb=np.zeros((3, 4))), "zero-norm"),
        (dict(image_emb=np.ones((2, 4))), "rows"),
        (dict(record_ids=np.array([1, 1, 2])), "unique"),
        (dict(record_ids=np.array([1.0, 2.0, 3.0])), "integers"),
        (dict(alignment_score=np.array([0.1, np.nan, 0.2])), "non-finite"),
        (dict(alignment_score=np.ones(2)), "shape"),
        (dict(sha256=["a", "b"]), "sha256"),
    ],
)
def test_bad_input_is_rejected(args, match):
    base = dict(image_emb=np.eye(3, 4, dtype=np.float32), text_emb=None, sha256=None, alignment_score=None,
                record_ids=np.arange(3))
    with pytest.raises(ValueError, match=match):
        find_duplicates(**{**base, **args})


def test_no_evidence_is_an_error():
    with pytest.raises(ValueError, match="no duplicate evidence"):
        find_duplicates(None, None, None, None, np.arange(3))


@pytest.mark.parametrize(
    "kwargs",
    [dict(image_threshold=0.0), dict(text_threshold=1.5), dict(k=0), dict(nprobe=0), dict(batch_size=0),
     dict(exact_max=-1), dict(nlist=0), dict(refine_factor=0), dict(threads=0), dict(k=2.5)],
)
def test_config_validation(kwargs):
    with pytest.raises(ValueError):
        DedupConfig(**kwargs)


@pytest.mark.parametrize("config", [None, PARTITIONED], ids=["exact", "partitioned"])
def test_max_cross_similarity(config):
    x, rid, score = planted(d=64, n=1200)
    assert max_cross_similarity(x, config) == pytest.approx(1.0, abs=1e-5)  # the exact copies
    res = find_duplicates(x, None, None, score, rid, EXACT)
    curated = x[res.keep]
    # after dedup the closest pair left is 90/100 at 0.949, just under the threshold
    assert max_cross_similarity(curated, config) == pytest.approx(0.949, abs=1e-5)
    assert np.isnan(max_cross_similarity(x[:1]))


def test_default_search_leaves_no_pair_above_the_threshold_in_dense_clusters():
    """What the blocking check curated_no_duplicates_left demands: in clusters larger than k (every row has more
    duplicates than it has neighbours searched), no two kept rows are still at or above the threshold."""
    from curation_dagster.core.dedup import max_cross_similarity

    rng = np.random.default_rng(5)
    centres = rng.standard_normal((20, 64)).astype(np.float32)
    x = np.repeat(centres, 100, axis=0) + 0.08 * rng.standard_normal((2000, 64)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    cfg = DedupConfig(image_threshold=0.95, text_threshold=None, use_sha256=False)
    assert cfg.exact_max >= 99_000  # the whole Rakuten catalogue is searched exactly (recall, see DedupConfig)
    sims = x[:100] @ x[:100].T
    assert (sims[np.triu_indices(100, 1)] >= 0.95).mean() > 0.5  # dense: most pairs of a cluster are duplicates
    res = find_duplicates(x, None, None, None, np.arange(2000), cfg)
    assert max_cross_similarity(x[res.keep]) < 0.95
    assert 20 <= res.keep.sum() < 200
