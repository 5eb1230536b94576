"""Cross-modal alignment scoring and filtering.

`alignment_score` is the cosine between a row's image and text embeddings: a product whose picture does not
match its title (wrong photo, placeholder, swapped listing) scores low. The filter drops the lowest-scoring rows
by a percentile cut (DataComp found percentile cuts more robust than absolute thresholds, because the score scale
depends on the model) and/or an absolute floor, either over the whole set or within each class: scores shift
between categories and languages, so a global cut can wipe out a class whose texts are simply harder.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import numpy as np

__all__ = ["AlignmentDecision", "AlignmentPolicy", "alignment_filter", "alignment_scores"]


def _as_unit_rows(x: np.ndarray, name: str) -> np.ndarray:
    """float32 copy with each row scaled to unit L2 norm; refuses non-finite values and zero rows."""
    a = np.asarray(x)
    if a.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array [n, d]; got shape {a.shape}")
    a = a.astype(np.float32, copy=True)
    if not np.isfinite(a).all():
        bad = np.flatnonzero(~np.isfinite(a).all(axis=1))
        raise ValueError(f"{name} has non-finite values in {bad.size} row(s), first rows: {bad[:5].tolist()}")
    norms = np.linalg.norm(a, axis=1)
    if a.shape[0] and (norms <= 1e-12).any():
        bad = np.flatnonzero(norms <= 1e-12)
        raise ValueError(f"{name} has zero-norm row(s) {bad[:5].tolist()} (cosine undefined)")
    a /= norms[:, None]
    return a


def alignment_scores(image_emb: np.ndarray, text_emb: np.ndarray) -> np.ndarray:
    """Row-wise cosine between image and text embeddings (float32 [n]).

    Inputs are expected L2-normalised; they are re-normalised anyway so a caller's slip cannot inflate scores.
    """
    img = _as_unit_rows(image_emb, "image_emb")
    txt = _as_unit_rows(text_emb, "text_emb")
    if img.shape != txt.shape:
        raise ValueError(f"image_emb {img.shape} and text_emb {txt.shape} must have the same shape [n, d]")
    scores = np.einsum("ij,ij->i", img, txt, dtype=np.float32)
    return np.clip(scores, -1.0, 1.0).astype(np.float32, copy=False)


@dataclass(frozen=True)
class AlignmentPolicy:
    """Which rows the alignment filter drops.

    A row is kept iff ``score >= threshold`` of its group (the whole set, or its class when ``per_class``).
    The group's threshold is the larger of
      * the percentile cut: the score of the ``floor(drop_fraction * m)``-th lowest row of the group (0-based),
        so at most that many rows fall below it. Rows tied with the cut score are all kept, never split
        arbitrarily (deterministic: equal scores, equal fate);
      * ``min_score`` (absolute floor).
    i.e. when both are given a row is dropped if EITHER rule applies. Afterwards, ``min_keep_per_class`` lowers
    the threshold of a group if needed so that at least that many of its best rows survive (never empties a
    class; with a global policy it applies to the whole set).
    """

    drop_fraction: float | None = 0.1
    min_score: float | None = None
    per_class: bool = True
    min_keep_per_class: int = 1

    def __post_init__(self) -> None:
        if self.drop_fraction is not None:
            f = self.drop_fraction
            if isinstance(f, bool) or not isinstance(f, (int, float)) or not math.isfinite(f) or not 0.0 <= f < 1.0:
                raise ValueError(f"drop_fraction must be a number in [0, 1) or None; got {f!r}")
        if self.min_score is not None:
            s = self.min_score
            if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s) or not -1.0 <= s <= 1.0:
                raise ValueError(f"min_score must be a cosine in [-1, 1] or None; got {s!r}")
        if isinstance(self.min_keep_per_class, bool) or not isinstance(self.min_keep_per_class, int) \
                or self.min_keep_per_class < 0:
            raise ValueError(f"min_keep_per_class must be an int >= 0; got {self.min_keep_per_class!r}")
        if not isinstance(self.per_class, bool):
            raise ValueError(f"per_class must be a bool; got {self.per_class!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "AlignmentPolicy":
        """The policy recorded by :meth:`to_dict` (e.g. in a manifest); unknown keys are ignored."""
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})


UNLABELLED_KEY = "unlabelled"


def unlabelled_mask(labels: np.ndarray) -> np.ndarray:
    """Rows without a class: None (object arrays) or NaN (a nullable integer column read into floats)."""
    lab = np.asarray(labels)
    if lab.dtype.kind == "f":
        return np.isnan(lab)
    if lab.dtype == object:
        return np.array([v is None or (isinstance(v, float) and math.isnan(v)) for v in lab], dtype=bool)
    return np.zeros(lab.shape[0], dtype=bool)


@dataclass
class AlignmentDecision:
    keep: np.ndarray  # bool [n]
    threshold_per_row: np.ndarray  # float32 [n]: the threshold applied to each row (keep iff score >= it)
    thresholds: dict  # {"global": t} or {class_code: t, ...}: plain Python floats, JSON-serialisable
    policy: AlignmentPolicy

    @property
    def n_removed(self) -> int:
        return int((~self.keep).sum())


def _group_threshold(scores: np.ndarray, policy: AlignmentPolicy) -> float:
    """Threshold for one group of scores (see AlignmentPolicy for the rule)."""
    s = np.sort(scores, kind="stable")
    m = s.size
    t = -math.inf
    if policy.drop_fraction is not None and policy.drop_fraction > 0:
        # the epsilon guards against 0.29 * 100 == 28.999999999999996
        n_drop = min(int(math.floor(policy.drop_fraction * m + 1e-9)), m - 1)
        if n_drop > 0:
            t = float(s[n_drop])
    if policy.min_score is not None:
        t = max(t, float(policy.min_score))
    keep_at_least = min(policy.min_keep_per_class, m)
    if keep_at_least > 0:
        t = min(t, float(s[m - keep_at_least]))  # the keep_at_least-th best score still passes
    if t == -math.inf:
        t = float(s[0])  # nothing cut: record the lowest score, which every row passes
    return t


def _class_codes(lab: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Class codes of the labelled ``rows``: integers from a float column (NaN = no class) or an object column of
    numbers; other labels (strings) as they are."""
    vals = lab[rows]
    if lab.dtype.kind == "f":
        return vals.astype(np.int64)
    if lab.dtype == object and all(isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)
                                   for v in vals):
        return vals.astype(np.int64)
    return vals


def thresholds_per_row(labels: np.ndarray | None, decision: AlignmentDecision, measured_scores: np.ndarray,
                       policy: AlignmentPolicy) -> np.ndarray:
    """The threshold ``decision`` sets for each of ``labels``'s rows, also rows it was not measured on (the other
    members of duplicate groups): their class's threshold; a class ``decision`` never saw, or a row without a
    class, gets the class-free cut over ``measured_scores`` (the scores the decision was measured on)."""
    th = decision.thresholds
    if "global" in th or labels is None:
        n = 0 if labels is None else len(labels)
        return np.full(n, np.float32(th.get("global", -np.inf)), dtype=np.float32)
    lab = np.asarray(labels)
    out = np.empty(lab.shape[0], dtype=np.float32)
    missing = unlabelled_mask(lab)
    fallback = th.get(UNLABELLED_KEY)
    if fallback is None:
        fallback = _group_threshold(np.asarray(measured_scores, dtype=np.float32), policy) \
            if len(measured_scores) else -math.inf
    out[missing] = fallback
    labelled = np.flatnonzero(~missing)
    codes = _class_codes(lab, labelled)
    out[labelled] = [th.get(c.item() if hasattr(c, "item") else c, fallback) for c in codes]
    return out


def alignment_filter(scores: np.ndarray, labels: np.ndarray | None, policy: AlignmentPolicy) -> AlignmentDecision:
    """Decide which rows survive the alignment filter.

    ``labels`` (one class code per row) is needed only for a per-class policy; with ``labels=None`` the
    policy is applied globally whatever ``per_class`` says, and ``thresholds`` shows it (``{"global": t}``).
    """
    if not isinstance(policy, AlignmentPolicy):
        raise TypeError(f"policy must be an AlignmentPolicy; got {type(policy).__name__}")
    s = np.asarray(scores)
    if s.ndim != 1:
        raise ValueError(f"scores must be 1-D; got shape {s.shape}")
    s = s.astype(np.float32, copy=False)
    if not np.isfinite(s).all():
        bad = np.flatnonzero(~np.isfinite(s))
        raise ValueError(f"scores has {bad.size} non-finite value(s), first rows: {bad[:5].tolist()}")
    n = s.size
    thr_row = np.empty(n, dtype=np.float32)
    thresholds: dict = {}
    if n == 0:
        return AlignmentDecision(np.zeros(0, dtype=bool), thr_row, {}, policy)

    if policy.per_class and labels is not None:
        lab = np.asarray(labels)
        if lab.ndim != 1 or lab.shape[0] != n:
            raise ValueError(f"labels must be 1-D with one entry per score ({n}); got shape {lab.shape}")
        missing = unlabelled_mask(lab)
        labelled = np.flatnonzero(~missing)
        if labelled.size:
            classes, inverse = np.unique(_class_codes(lab, labelled), return_inverse=True)
            for ci, cls in enumerate(classes):
                rows = labelled[inverse == ci]
                t = _group_threshold(s[rows], policy)
                thr_row[rows] = t
                thresholds[cls.item() if hasattr(cls, "item") else cls] = t
        if missing.any():
            # Rows without a class have no class distribution to cut within: they get the class-free (global) cut,
            # computed over every row of the set.
            t = _group_threshold(s, policy)
            thr_row[missing] = t
            thresholds[UNLABELLED_KEY] = t
    else:
        t = _group_threshold(s, policy)
        thr_row[:] = t
        thresholds["global"] = t
    # compare in float32 on both sides so a threshold equal to a row's own score always keeps that row
    keep = s >= thr_row
    return AlignmentDecision(keep=keep, threshold_per_row=thr_row, thresholds=thresholds, policy=policy)
