"""Alignment scoring and filtering on synthetic embeddings with known answers."""
from __future__ import annotations

import json

import numpy as np
import pytest

from curation_dagster.core.alignment import AlignmentPolicy, alignment_filter, alignment_scores


def unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def at_cosine(v: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    """A unit vector at exactly cosine c to unit vector v: c*v + sqrt(1-c^2)*u with u ⟂ v."""
    u = rng.standard_normal(v.shape[0])
    u -= u.dot(v) * v
    u /= np.linalg.norm(u)
    return c * v + np.sqrt(1.0 - c * c) * u


# ---------------------------------------------------------------- scores

def test_scores_are_the_planted_cosines_even_for_unnormalised_input():
    rng = np.random.default_rng(0)
    img = unit(rng, 50, 96)
    cos = rng.uniform(-0.5, 0.9, size=50)
    txt = np.stack([at_cosine(img[i], cos[i], rng) for i in range(50)])
    s = alignment_scores(img.astype(np.float32), txt.astype(np.float32))
    assert s.dtype == np.float32 and s.shape == (50,)
    np.testing.assert_allclose(s, cos, atol=1e-5)
    # scaled rows (a caller forgot to normalise) give the same cosines
    scale = rng.uniform(0.1, 10.0, size=(50, 1))
    np.testing.assert_allclose(alignment_scores(img * scale, txt * 3.0), cos, atol=1e-5)


@pytest.mark.parametrize(
    "img, txt, match",
    [
        (np.ones((3, 4)), np.ones((3, 5)), "same shape"),
        (np.ones((3, 4)), np.ones((2, 4)), "same shape"),
        (np.ones(4), np.ones(4), "2-D"),
        (np.array([[1.0, np.nan], [1.0, 0.0]]), np.ones((2, 2)), "non-finite"),
        (np.array([[0.0, 0.0], [1.0, 0.0]]), np.ones((2, 2)), "zero-norm"),
    ],
)
def test_scores_reject_bad_input(img, txt, match):
    with pytest.raises(ValueError, match=match):
        alignment_scores(img, txt)


# ---------------------------------------------------------------- filter: swapped pairs

def _swapped_dataset(seed: int = 1, n: int = 200, d: int = 256, n_swapped: int = 10):
    """Aligned pairs at cosine 0.25-0.35 (CLIP-like); texts of a few rows permuted among themselves."""
    rng = np.random.default_rng(seed)
    img = unit(rng, n, d)
    txt = np.stack([at_cosine(img[i], rng.uniform(0.25, 0.35), rng) for i in range(n)])
    swapped = np.sort(rng.choice(n, size=n_swapped, replace=False))
    txt[swapped] = txt[np.roll(swapped, 1)]  # a cyclic shift: every swapped row gets another row's text
    return img.astype(np.float32), txt.astype(np.float32), swapped


def test_swapped_pairs_are_exactly_the_ones_removed_by_percentile_cut():
    img, txt, swapped = _swapped_dataset()
    scores = alignment_scores(img, txt)
    assert scores[swapped].max() < 0.2 < scores[np.setdiff1d(np.arange(200), swapped)].min()  # sanity of the setup
    dec = alignment_filter(scores, None, AlignmentPolicy(drop_fraction=10 / 200, per_class=False))
    np.testing.assert_array_equal(np.flatnonzero(~dec.keep), swapped)
    assert set(dec.thresholds) == {"global"}
    # the recorded threshold is the one applied: every kept row is >= it, every removed row below it
    t = dec.thresholds["global"]
    assert (scores[dec.keep] >= t).all() and (scores[~dec.keep] < t).all()
    np.testing.assert_array_equal(dec.threshold_per_row, np.float32(t))


def test_swapped_pairs_are_exactly_the_ones_removed_by_absolute_floor():
    img, txt, swapped = _swapped_dataset(seed=2)
    dec = alignment_filter(alignment_scores(img, txt), None,
                           AlignmentPolicy(drop_fraction=None, min_score=0.2, per_class=False))
    np.testing.assert_array_equal(np.flatnonzero(~dec.keep), swapped)
    assert dec.thresholds == {"global": pytest.approx(0.2)}


def test_swapped_pairs_removed_per_class():
    img, txt, swapped = _swapped_dataset(seed=3)
    labels = np.repeat([10, 40, 1280, 2705], 50)
    dec = alignment_filter(alignment_scores(img, txt), labels,
                           AlignmentPolicy(drop_fraction=None, min_score=0.2, per_class=True))
    np.testing.assert_array_equal(np.flatnonzero(~dec.keep), swapped)
    assert set(dec.thresholds) == {10, 40, 1280, 2705}


# ---------------------------------------------------------------- filter: per-class vs global

def _shifted_classes():
    """Class 7's scores are all below every other class's (a harder language / category)."""
    rng = np.random.default_rng(4)
    labels = np.repeat([7, 8, 9], 50)
    scores = np.concatenate([rng.uniform(0.10, 0.20, 50), rng.uniform(0.25, 0.40, 50), rng.uniform(0.25, 0.40, 50)])
    perm = rng.permutation(150)  # interleave so nothing depends on row order
    return scores[perm].astype(np.float32), labels[perm]


def test_global_cut_wipes_out_a_shifted_class_but_per_class_keeps_every_class():
    scores, labels = _shifted_classes()
    glob = alignment_filter(scores, labels, AlignmentPolicy(drop_fraction=1 / 3, per_class=False))
    assert (glob.keep[labels == 7]).sum() == 0  # the contrast: a global percentile removes all of class 7
    per = alignment_filter(scores, labels, AlignmentPolicy(drop_fraction=1 / 3, per_class=True))
    for c in (7, 8, 9):
        rows = labels == c
        assert per.keep[rows].sum() == 50 - 16  # floor(50/3) dropped in each class
        assert (per.threshold_per_row[rows] == np.float32(per.thresholds[c])).all()
        # the lowest 16 of the class are the ones dropped
        order = np.argsort(scores[rows], kind="stable")
        assert not per.keep[rows][order[:16]].any() and per.keep[rows][order[16:]].all()
    json.dumps(per.thresholds)  # JSON-serialisable for the manifest
    json.dumps(per.policy.to_dict())


def test_min_keep_per_class_never_empties_a_class_under_an_absolute_floor():
    scores, labels = _shifted_classes()
    wiped = alignment_filter(scores, labels, AlignmentPolicy(drop_fraction=None, min_score=0.22, per_class=False))
    assert wiped.keep[labels == 7].sum() == 0
    for m in (1, 5):
        dec = alignment_filter(scores, labels,
                               AlignmentPolicy(drop_fraction=None, min_score=0.22, per_class=True,
                                               min_keep_per_class=m))
        kept7 = np.flatnonzero(dec.keep & (labels == 7))
        assert kept7.size == m
        best = np.flatnonzero(labels == 7)[np.argsort(-scores[labels == 7], kind="stable")[:m]]
        np.testing.assert_array_equal(np.sort(kept7), np.sort(best))
        # other classes are untouched by the floor (all above 0.22)
        assert dec.keep[labels != 7].all()
    # min_keep_per_class=0 lets the floor empty the class
    dec0 = alignment_filter(scores, labels, AlignmentPolicy(drop_fraction=None, min_score=0.22, min_keep_per_class=0))
    assert dec0.keep[labels == 7].sum() == 0


def test_both_rules_drop_a_row_if_either_applies():
    scores = np.array([0.05, 0.1, 0.3, 0.31, 0.32, 0.33, 0.34, 0.35, 0.36, 0.37], dtype=np.float32)
    only_pct = alignment_filter(scores, None, AlignmentPolicy(drop_fraction=0.1, per_class=False))
    only_abs = alignment_filter(scores, None, AlignmentPolicy(drop_fraction=None, min_score=0.2, per_class=False))
    both = alignment_filter(scores, None, AlignmentPolicy(drop_fraction=0.1, min_score=0.2, per_class=False))
    assert (~only_pct.keep).sum() == 1 and (~only_abs.keep).sum() == 2
    np.testing.assert_array_equal(both.keep, only_pct.keep & only_abs.keep)
    higher = alignment_filter(scores, None, AlignmentPolicy(drop_fraction=0.3, min_score=0.2, per_class=False))
    assert (~higher.keep).sum() == 3  # the percentile is now the stricter rule


def test_ties_at_the_cut_are_all_kept_and_the_result_is_order_independent():
    scores = np.array([0.1, 0.2, 0.2, 0.2, 0.5], dtype=np.float32)
    dec = alignment_filter(scores, None, AlignmentPolicy(drop_fraction=0.4, per_class=False))
    # floor(0.4 * 5) = 2 rows asked, but rows 1-3 tie at the cut: equal scores share one fate
    np.testing.assert_array_equal(dec.keep, [False, True, True, True, True])
    assert dec.thresholds["global"] == pytest.approx(0.2)
    rng = np.random.default_rng(5)
    s = rng.choice(np.linspace(0, 1, 7), size=300).astype(np.float32)  # many ties
    lab = rng.integers(0, 4, size=300)
    pol = AlignmentPolicy(drop_fraction=0.25)
    ref = alignment_filter(s, lab, pol).keep
    perm = rng.permutation(300)
    np.testing.assert_array_equal(alignment_filter(s[perm], lab[perm], pol).keep, ref[perm])


def test_no_cut_keeps_everything_and_records_a_threshold_every_row_passes():
    scores = np.array([0.3, -0.2, 0.1], dtype=np.float32)
    dec = alignment_filter(scores, None, AlignmentPolicy(drop_fraction=0.0, per_class=False))
    assert dec.keep.all() and dec.thresholds["global"] == pytest.approx(-0.2)
    small = alignment_filter(scores, np.array([1, 1, 2]), AlignmentPolicy(drop_fraction=0.4))
    assert small.keep.all()  # floor(0.4 * 2) = 0 and floor(0.4 * 1) = 0 rows to drop


def test_labels_none_falls_back_to_global():
    scores = np.linspace(0, 1, 20, dtype=np.float32)
    dec = alignment_filter(scores, None, AlignmentPolicy(drop_fraction=0.1, per_class=True))
    assert list(dec.thresholds) == ["global"] and (~dec.keep).sum() == 2


def test_string_labels_work():
    scores = np.array([0.1, 0.9, 0.2, 0.8], dtype=np.float32)
    dec = alignment_filter(scores, np.array(["fr", "fr", "de", "de"]),
                           AlignmentPolicy(drop_fraction=0.5))
    np.testing.assert_array_equal(dec.keep, [False, True, False, True])
    assert json.loads(json.dumps(dec.thresholds)) == {"de": pytest.approx(0.8), "fr": pytest.approx(0.9)}


@pytest.mark.parametrize(
    "kwargs",
    [dict(drop_fraction=1.0), dict(drop_fraction=-0.1), dict(drop_fraction=float("nan")), dict(drop_fraction="0.1"),
     dict(min_score=1.5), dict(min_score=float("inf")), dict(min_keep_per_class=-1), dict(min_keep_per_class=1.5),
     dict(per_class="yes")],
)
def test_policy_validation(kwargs):
    with pytest.raises(ValueError):
        AlignmentPolicy(**kwargs)


def test_filter_rejects_bad_input():
    pol = AlignmentPolicy()
    with pytest.raises(ValueError, match="non-finite"):
        alignment_filter(np.array([0.1, np.nan]), None, pol)
    with pytest.raises(ValueError, match="one entry per score"):
        alignment_filter(np.array([0.1, 0.2]), np.array([1, 2, 3]), pol)
    with pytest.raises(ValueError, match="1-D"):
        alignment_filter(np.ones((2, 2)), None, pol)
    with pytest.raises(TypeError):
        alignment_filter(np.array([0.1]), None, {"drop_fraction": 0.1})
    empty = alignment_filter(np.zeros(0), None, pol)
    assert empty.keep.shape == (0,) and empty.thresholds == {}


def test_unlabelled_rows_get_the_class_free_cut():
    """Rows without a class (None, or NaN from a nullable column) are cut by the global percentile over all rows."""
    rng = np.random.default_rng(3)
    labelled = rng.uniform(0.5, 0.9, 60).astype(np.float32)   # class 1: high scores
    unlabelled = rng.uniform(0.0, 0.4, 20).astype(np.float32)  # no class: low scores
    scores = np.concatenate([labelled, unlabelled])
    pol = AlignmentPolicy(drop_fraction=0.25, per_class=True)
    for labels in (np.array([1] * 60 + [None] * 20, dtype=object), np.array([1.0] * 60 + [np.nan] * 20)):
        dec = alignment_filter(scores, labels, pol)
        glob = alignment_filter(scores, None, AlignmentPolicy(drop_fraction=0.25, per_class=False))
        assert set(dec.thresholds) == {1, "unlabelled"}
        assert dec.thresholds["unlabelled"] == glob.thresholds["global"]
        assert np.array_equal(dec.keep[60:], glob.keep[60:])
        assert dec.thresholds[1] == alignment_filter(labelled, np.ones(60, int), pol).thresholds[1]
    only_unlabelled = alignment_filter(unlabelled, np.array([None] * 20, dtype=object), pol)
    assert set(only_unlabelled.thresholds) == {"unlabelled"} and only_unlabelled.keep.sum() == 15
