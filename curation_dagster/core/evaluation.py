"""Downstream evaluation: does curation keep accuracy with fewer rows?

One fair experiment, written so that it cannot flatter curation:

* a stratified held-out **test** set is drawn from *all* clean rows before curation; it is never curated and
  never trained on;
* the curation callback only ever sees the **training** rows;
* three training sets get the same features and the same LightGBM settings: **raw** (every training row),
  **curated** (the rows curation kept) and **random** (a random subset of raw with exactly as many rows as
  curated, redrawn per seed) -- the control that separates "curation helped" from "fewer rows";
* everything is repeated over several seeds and reported as mean +- sample standard deviation.

Plain Python (numpy, scikit-learn, LightGBM); never imports dagster.
"""
from __future__ import annotations

import hashlib
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import lightgbm as lgb
import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score


MODALITIES = ("image+text", "image", "text")
TRAINING_SETS = ("raw", "curated", "random")
METRICS = ("accuracy", "macro_f1", "weighted_f1")


MEANINGLESS_NOTE = "tiny-random model: these numbers are meaningless"

_SET_DESCRIPTIONS = {
    "raw": "every clean training row (no curation)",
    "curated": "the training rows that curation (alignment filter + dedup, re-run on the training rows only) kept",
    "random": "a random subset of the raw training rows with exactly as many rows as *curated*, redrawn per seed "
    "(the control for 'fewer rows')",
}


@dataclass(frozen=True)
class EvaluationConfig:
    test_fraction: float = 0.2
    split_seed: int = 0
    seeds: tuple[int, ...] = (0, 1, 2)
    modalities: tuple[str, ...] = ("image+text",)  # any of "image+text", "image", "text"
    validation_fraction: float = 0.15  # early-stopping split taken from the TRAINING rows
    num_boost_round: int = 500
    # The fast default (benchmarks/bench_evaluation.py measures its macro-F1 against FULL_SETTING below):
    early_stopping_rounds: int = 15
    learning_rate: float = 0.2
    num_threads: int = 0  # 0 = LightGBM default; tests use small numbers
    # Feature reduction: PCA to this many components, fitted on the raw TRAINING rows only (never on test rows),
    # the same projection for all three training sets. 0 = off (the full embedding). Histogram work is linear in
    # the feature count: 1024 ViT-B/32 dims -> 256 is ~4x less per round. 64 was measured too few: on the
    # synthetic set with high-variance class-free directions it lost ~25 macro-F1 points (bench_evaluation.py);
    # 256 gained there.
    feature_dims: int = 256
    # Rows each tree is grown on (LightGBM bagging, redrawn every round from the seed): above this many fit rows
    # every tree sees a random `rows_per_tree` of them, so a round's histogram cost stops growing with the data
    # while every training row still takes part. The test rows are never involved. 0 = every row for every tree.
    rows_per_tree: int = 8192
    max_leaves: int = 31  # upper clip of the size-scaled num_leaves
    early_stopping_min_delta: float = 1e-3  # a validation multi-logloss gain below this is "no improvement"

    def __post_init__(self) -> None:
        if not 0.0 < self.test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1); got {self.test_fraction}")
        if not 0.0 <= self.validation_fraction < 1.0:
            raise ValueError(f"validation_fraction must be in [0, 1); got {self.validation_fraction}")
        if len(self.seeds) == 0:
            raise ValueError("seeds must name at least one seed")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct; got {self.seeds}")
        if len(self.modalities) == 0:
            raise ValueError("modalities must name at least one of " + ", ".join(MODALITIES))
        bad = [m for m in self.modalities if m not in MODALITIES]
        if bad:
            raise ValueError(f"unknown modalities {bad}; choose from {list(MODALITIES)}")
        if len(set(self.modalities)) != len(self.modalities):
            raise ValueError(f"modalities must be distinct; got {self.modalities}")
        if self.num_boost_round < 1 or self.early_stopping_rounds < 1:
            raise ValueError("num_boost_round and early_stopping_rounds must be >= 1")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0; got {self.learning_rate}")
        if self.num_threads < 0:
            raise ValueError(f"num_threads must be >= 0; got {self.num_threads}")
        if self.feature_dims < 0:
            raise ValueError(f"feature_dims must be >= 0 (0 = no reduction); got {self.feature_dims}")
        if self.rows_per_tree < 0:
            raise ValueError(f"rows_per_tree must be >= 0 (0 = every row); got {self.rows_per_tree}")
        if self.max_leaves < 2:
            raise ValueError(f"max_leaves must be >= 2; got {self.max_leaves}")
        if self.early_stopping_min_delta < 0:
            raise ValueError(f"early_stopping_min_delta must be >= 0; got {self.early_stopping_min_delta}")


# The setting used before the fast default (full embeddings, every row per tree, lr 0.1, patience 30, up to 63
# leaves): kept for comparisons -- EvaluationConfig(**FULL_SETTING) reproduces it.
FULL_SETTING = dict(feature_dims=0, rows_per_tree=0, max_leaves=63, learning_rate=0.1, early_stopping_rounds=30,
                    early_stopping_min_delta=0.0)


@dataclass
class EvaluationResult:
    metrics: dict  # JSON-serialisable, see run_evaluation
    verdict: str  # one honest line
    markdown: str  # report.md content (write_report replaces it with the exact text it wrote)
    headline: dict[str, float]  # flat numeric metadata for the Dagster UI
    confusion: np.ndarray  # curated model (first modality, first seed) on the test set, rows = true class
    class_order: list[int]  # label codes in confusion / encoding order
    predictions: dict = field(repr=False)  # y_true, eval_labels, per-run predictions and training rows
    category_names: dict[int, str] | None = None
    meaningless: bool = False
    plot_files: dict[str, str] = field(default_factory=dict)  # plot kind -> file name, once write_report ran


# --------------------------------------------------------------------------------------------- splitting


def stratified_test_split(labels: np.ndarray, test_fraction: float, seed: int,
                          groups: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic per-class split: returns (train_idx, test_idx), both sorted.

    Every class with >= 2 rows gets at least one test row *and* keeps at least one training row; a class with a
    single row stays in training (it cannot be both learned and tested). scikit-learn's stratified splitters
    refuse such classes outright, which is why this is a few lines of numpy instead.

    ``groups`` (one id per row: curation's duplicate groups) keeps every group on one side: a test row whose copy
    sits in training is partly a memorisation test, and since dedup keeps one member of each group while a random
    subset often keeps none, it flattered curated over random (a planted case: 29 of 29 test items had a copy in the
    curated training set, 18 in the random one).
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D; got shape {labels.shape}")
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1); got {test_fraction}")
    if groups is not None:
        groups = np.asarray(groups)
        if groups.shape != labels.shape:
            raise ValueError(f"groups must have one entry per row ({labels.size}); got shape {groups.shape}")
        if np.unique(groups).size < labels.size:
            return _grouped_split(labels, test_fraction, seed, groups)
    rng = np.random.default_rng(seed)
    test_parts: list[np.ndarray] = []
    for cls in np.unique(labels):  # sorted -> deterministic order of rng draws
        rows = np.flatnonzero(labels == cls)
        n = rows.size
        if n < 2 or test_fraction == 0.0:
            continue
        n_test = min(max(1, int(round(n * test_fraction))), n - 1)
        test_parts.append(rng.choice(rows, size=n_test, replace=False))
    test_idx = np.sort(np.concatenate(test_parts)) if test_parts else np.empty(0, dtype=np.int64)
    mask = np.ones(labels.size, dtype=bool)
    mask[test_idx] = False
    return np.flatnonzero(mask).astype(np.int64), test_idx.astype(np.int64)


def _grouped_split(labels: np.ndarray, test_fraction: float, seed: int,
                   groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Whole groups to the test side, per class (a group counts for the class of its first row) until the class's
    share of test rows is reached; at least one group of each class stays in training."""
    rng = np.random.default_rng(seed)
    _, first, inverse = np.unique(groups, return_index=True, return_inverse=True)
    size = np.bincount(inverse)
    group_class = labels[first]
    chosen: list[np.ndarray] = []
    for cls in np.unique(group_class):
        gs = np.flatnonzero(group_class == cls)
        n_rows = int(size[gs].sum())
        if gs.size < 2 or test_fraction == 0.0:
            continue
        target = min(max(1, int(round(n_rows * test_fraction))), n_rows - 1)
        order = rng.permutation(gs)
        taken = min(int(np.searchsorted(np.cumsum(size[order]), target)) + 1, gs.size - 1)
        chosen.append(order[:taken])
    in_test = np.isin(inverse, np.concatenate(chosen)) if chosen else np.zeros(labels.size, dtype=bool)
    return np.flatnonzero(~in_test).astype(np.int64), np.flatnonzero(in_test).astype(np.int64)


# --------------------------------------------------------------------------------------------- LightGBM


def lgbm_params(n_train: int, n_classes: int, config: EvaluationConfig, seed: int = 0) -> dict:
    """LightGBM multiclass parameters scaled to the data size.

    The defaults (min_data_in_leaf=20, num_leaves=31) cannot split at ~15 rows per class (the bundled sample:
    ~400 training rows x 27 classes) and are needlessly loose at 100k+ rows. Both grow with rows per class:
    min_data_in_leaf = rows_per_class / 5 clipped to [2, 50]; num_leaves = 2 * sqrt(rows_per_class) clipped to
    [4, 63]. Cost is dominated by split finding over ~1024 dense embedding features x bins x 27 trees per round,
    so max_bin = n_train / 64 clipped to [15, 63] (a few hundred rows cannot fill more bins anyway; 3x faster
    at the sample's size) and feature_fraction=0.5 (embedding dimensions are redundant; ~2x faster, same F1 in
    our runs).
    """
    if n_train < 1:
        raise ValueError(f"n_train must be >= 1; got {n_train}")
    if n_classes < 2:
        raise ValueError(f"need at least 2 classes for a multiclass model; got {n_classes}")
    per_class = n_train / n_classes
    max_bin = int(np.clip(n_train // 64, 15, 63))
    min_data_in_leaf = int(np.clip(round(per_class / 5), 2, 50))
    num_leaves = int(np.clip(2 * math.ceil(math.sqrt(max(per_class, 1.0))), 4, max(4, config.max_leaves)))
    params = {
        "objective": "multiclass",
        "num_class": int(n_classes),
        "learning_rate": float(config.learning_rate),
        "num_leaves": num_leaves,
        "min_data_in_leaf": min_data_in_leaf,
        "min_sum_hessian_in_leaf": 1e-3,
        "feature_fraction": 0.5,
        "lambda_l2": 1.0,
        "max_bin": max_bin,
        "metric": "multi_logloss",
        "seed": int(seed),
        "deterministic": True,
        "force_col_wise": True,
        "verbosity": -1,
    }
    if config.num_threads:
        params["num_threads"] = int(config.num_threads)
    return params


def _train_predict(
    X_train: np.ndarray, y_train: np.ndarray, X_test: np.ndarray, n_classes: int, config: EvaluationConfig,
    seed: int, base_params: dict, groups: np.ndarray | None = None,
) -> tuple[np.ndarray, dict]:
    """Fit on one training set (early stopping on a stratified split of it, duplicate groups kept on one side: a
    validation row with its copy in the fit rows would stop the raw set's training late) and predict the test
    rows."""
    fit_idx, val_idx = stratified_test_split(y_train, config.validation_fraction, seed, groups)
    params = {**base_params, "seed": int(seed)}
    bagging_fraction = 1.0
    if config.rows_per_tree and fit_idx.size > config.rows_per_tree:
        bagging_fraction = config.rows_per_tree / fit_idx.size
        params.update(bagging_fraction=bagging_fraction, bagging_freq=1, bagging_seed=int(seed))
    t0 = time.perf_counter()
    train_ds = lgb.Dataset(X_train[fit_idx], label=y_train[fit_idx], params=params)
    if val_idx.size:
        val_ds = lgb.Dataset(X_train[val_idx], label=y_train[val_idx], reference=train_ds)
        booster = lgb.train(
            params,
            train_ds,
            num_boost_round=config.num_boost_round,
            valid_sets=[val_ds],
            callbacks=[lgb.early_stopping(config.early_stopping_rounds, verbose=False,
                                          min_delta=config.early_stopping_min_delta)],
        )
        best_iteration = int(booster.best_iteration) or config.num_boost_round
    else:  # every class has a single row: nothing to hold out, train the full number of rounds
        booster = lgb.train(params, train_ds, num_boost_round=config.num_boost_round)
        best_iteration = config.num_boost_round
    seconds = time.perf_counter() - t0
    rounds_trained = int(booster.current_iteration())
    proba = booster.predict(X_test, num_iteration=best_iteration)
    proba = np.asarray(proba).reshape(X_test.shape[0], n_classes)
    info = {
        "train_seconds": seconds,
        "best_iteration": best_iteration,
        "n_fit": int(fit_idx.size),
        "n_validation": int(val_idx.size),
        "early_stopping": bool(val_idx.size),
        "rounds_trained": rounds_trained,
        "bagging_fraction": round(bagging_fraction, 4),
        "stopped_early": bool(val_idx.size) and rounds_trained < config.num_boost_round,
    }
    return proba.argmax(axis=1), info


# --------------------------------------------------------------------------------------------- features


def fit_pca(X_fit: np.ndarray, dims: int) -> tuple[np.ndarray, np.ndarray, float]:
    """PCA by eigen-decomposition of the covariance of ``X_fit`` (deterministic: no randomised solver, signs fixed
    so that each component's largest-magnitude loading is positive). Returns (mean, components [d, k], explained
    variance ratio of the k components)."""
    X_fit = np.asarray(X_fit, dtype=np.float32)
    mean = X_fit.mean(axis=0, dtype=np.float64)
    cov = np.zeros((X_fit.shape[1], X_fit.shape[1]), dtype=np.float64)
    for start in range(0, X_fit.shape[0], 16384):  # chunks: no centred copy of the whole matrix
        c = X_fit[start:start + 16384] - mean.astype(np.float32)
        cov += (c.T @ c).astype(np.float64)
    cov /= max(1, X_fit.shape[0] - 1)
    vals, vecs = np.linalg.eigh(cov)
    order = np.argsort(vals)[::-1][:dims]
    comps = vecs[:, order]
    signs = np.sign(comps[np.abs(comps).argmax(axis=0), np.arange(comps.shape[1])])
    comps = comps * np.where(signs == 0, 1.0, signs)
    total = float(np.clip(vals, 0, None).sum())
    explained = float(np.clip(vals[order], 0, None).sum() / total) if total > 0 else 1.0
    return mean.astype(np.float32), comps.astype(np.float32), explained


def reduce_features(X: np.ndarray, fit_rows: np.ndarray, dims: int) -> tuple[np.ndarray, dict]:
    """Project every row of ``X`` onto the top ``dims`` principal components of ``X[fit_rows]`` only.

    ``fit_rows`` are the raw training rows: the held-out test rows never influence the projection (they are only
    transformed by it), and the three training sets share one feature map. No reduction when ``dims`` is 0 or not
    below the feature count."""
    d = int(X.shape[1])
    if not dims or dims >= d:
        return X, {"method": "none", "input_dims": d, "dims": d}
    t0 = time.perf_counter()
    mean, comps, explained = fit_pca(X[fit_rows], dims)
    Z = np.empty((X.shape[0], dims), dtype=np.float32)
    for start in range(0, X.shape[0], 16384):
        Z[start:start + 16384] = (X[start:start + 16384] - mean) @ comps
    return Z, {"method": "pca", "input_dims": d, "dims": int(dims), "explained_variance": round(explained, 4),
               "fit_rows": int(len(fit_rows)), "fit_on": "raw training rows only (test rows are never seen)",
               "seconds": round(time.perf_counter() - t0, 3)}


# --------------------------------------------------------------------------------------------- metrics


def _metrics(y_true: np.ndarray, y_pred: np.ndarray, eval_labels: np.ndarray) -> dict:
    """accuracy, macro-F1 (SIGIR eCom'20), weighted-F1 (Rakuten challenge), per-class F1 -- all sklearn.

    F1 is computed over the classes present in the test set (``eval_labels``): a class without test rows has no
    defined recall, and predicting it wrongly is already counted against the true class's recall.
    """
    per_class = f1_score(y_true, y_pred, labels=eval_labels, average=None, zero_division=0)
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, labels=eval_labels, average="macro", zero_division=0)),
        "weighted_f1": float(f1_score(y_true, y_pred, labels=eval_labels, average="weighted", zero_division=0)),
        "per_class_f1": {int(c): float(v) for c, v in zip(eval_labels, per_class)},
    }


def _mean_std(values: list[float]) -> tuple[float, float]:
    arr = np.asarray(values, dtype=float)
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else 0.0


def _sha256_ids(ids: np.ndarray) -> str:
    text = "\n".join(str(x) for x in sorted(np.asarray(ids).tolist()))
    return hashlib.sha256(text.encode()).hexdigest()


def _modality_features(modality: str, image_emb: np.ndarray, text_emb: np.ndarray) -> np.ndarray:
    if modality == "image":
        return image_emb
    if modality == "text":
        return text_emb
    return np.concatenate([image_emb, text_emb], axis=1)


def _check_inputs(record_ids, labels, image_emb, text_emb) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    record_ids = np.asarray(record_ids)
    labels = np.asarray(labels)
    image_emb = np.asarray(image_emb, dtype=np.float32)
    text_emb = np.asarray(text_emb, dtype=np.float32)
    n = labels.shape[0] if labels.ndim else 0
    if labels.ndim != 1 or n == 0:
        raise ValueError(f"labels must be a non-empty 1-D array; got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integer class codes (prdtypecode); got dtype {labels.dtype}")
    if record_ids.shape != (n,):
        raise ValueError(f"record_ids has shape {record_ids.shape}; expected ({n},) to match labels")
    if np.unique(record_ids).size != n:
        raise ValueError("record_ids must be unique (one row per record)")
    for name, emb in (("image_emb", image_emb), ("text_emb", text_emb)):
        if emb.ndim != 2 or emb.shape[0] != n:
            raise ValueError(f"{name} has shape {emb.shape}; expected ({n}, d) to match labels")
        if not np.isfinite(emb).all():
            raise ValueError(f"{name} contains NaN or infinite values")
    if np.unique(labels).size < 2:
        raise ValueError("need at least 2 classes to evaluate a classifier")
    return record_ids, labels, image_emb, text_emb


# --------------------------------------------------------------------------------------------- main entry


def _curated_training_rows(curate: Callable[[np.ndarray], np.ndarray], train_idx: np.ndarray) -> np.ndarray:
    """The training rows curation keeps, from curate(train_idx)'s boolean mask (checked)."""
    keep = np.asarray(curate(train_idx.copy()))
    if keep.dtype != bool:
        raise TypeError(f"curate() must return a boolean keep-mask over the training rows; got dtype {keep.dtype}")
    if keep.shape != train_idx.shape:
        raise ValueError(f"curate() returned a mask of shape {keep.shape}; expected {train_idx.shape}")
    curated_idx = train_idx[keep]
    if curated_idx.size == 0:
        raise ValueError("curation kept no training rows: nothing to train the curated model on")
    return curated_idx


def _training_sets(train_idx: np.ndarray, curated_idx: np.ndarray, seeds) -> dict[str, dict[int, np.ndarray]]:
    """raw, curated and a same-size random subset of raw (redrawn per seed): set -> seed -> row indices."""
    sets: dict[str, dict[int, np.ndarray]] = {"raw": {}, "curated": {}, "random": {}}
    for seed in seeds:
        rng = np.random.default_rng([int(seed), 7919])  # own stream: independent of the LightGBM seed
        sets["raw"][seed] = train_idx
        sets["curated"][seed] = curated_idx
        sets["random"][seed] = np.sort(rng.choice(train_idx, size=curated_idx.size, replace=False))
    return sets


@dataclass
class _Experiment:
    """What every fit of one evaluation shares: labels, the split, the training sets and the settings."""

    labels: np.ndarray
    y: np.ndarray  # labels encoded 0..K-1
    class_order: list[int]
    train_idx: np.ndarray
    test_idx: np.ndarray
    eval_labels: np.ndarray
    train_sets: dict[str, dict[int, np.ndarray]]
    config: "EvaluationConfig"
    base_params: dict
    say: Callable[[str], None]
    groups: np.ndarray | None = None  # duplicate group per input row (kept on one side of every split)

    def classes_missing(self, rows: np.ndarray) -> list[int]:
        present = set(np.unique(self.y[rows]).tolist())
        return [c for i, c in enumerate(self.class_order) if i not in present]

    def evaluate_modality(self, modality: str, X_full: np.ndarray) -> tuple[dict, dict]:
        """Fit every training set x seed on one feature set; returns (predictions, metrics) for the modality."""
        config, say = self.config, self.say
        X, reduction = reduce_features(np.ascontiguousarray(X_full), self.train_idx, config.feature_dims)
        del X_full
        if reduction["method"] != "none":
            say(f"{modality}: PCA {reduction['input_dims']} -> {reduction['dims']} dims fitted on "
                f"{self.train_idx.size} training rows (explained variance {reduction['explained_variance']:.3f}, "
                f"{reduction['seconds']:.1f}s)")
        X_test = X[self.test_idx]
        runs: dict[str, dict[int, np.ndarray]] = {s: {} for s in TRAINING_SETS}
        sets_out = {set_name: self._fit_set(modality, set_name, X, X_test, runs[set_name])
                    for set_name in TRAINING_SETS}
        return runs, {
            "n_features": int(X.shape[1]),
            "feature_reduction": reduction,
            "sets": sets_out,
            "delta_vs_random": _paired_delta(sets_out, "random", config.seeds),
            "delta_vs_raw": _paired_delta(sets_out, "raw", config.seeds),
        }

    def _fit_set(self, modality: str, set_name: str, X: np.ndarray, X_test: np.ndarray,
                 runs: dict[int, np.ndarray]) -> dict:
        config, n_classes = self.config, len(self.class_order)
        per_seed: dict[str, dict] = {}
        per_class_runs: list[dict[int, float]] = []
        for seed in config.seeds:
            rows = self.train_sets[set_name][seed]
            pred_enc, info = _train_predict(X[rows], self.y[rows], X_test, n_classes, config, seed, self.base_params,
                                            None if self.groups is None else self.groups[rows])
            y_pred = np.asarray(self.class_order)[pred_enc]
            runs[seed] = y_pred
            m = _metrics(self.labels[self.test_idx], y_pred, self.eval_labels)
            per_class_runs.append(m.pop("per_class_f1"))
            per_seed[str(seed)] = {
                **m,
                "n_train": int(rows.size),
                "train_seconds": round(info["train_seconds"], 4),
                "best_iteration": info["best_iteration"],
                "rounds_trained": info["rounds_trained"],
                "bagging_fraction": info["bagging_fraction"],
                "stopped_early": info["stopped_early"],
                "n_validation": info["n_validation"],
            }
            self.say(
                f"{modality} seed {seed} {set_name:>7}: n={rows.size} macro-F1={m['macro_f1']:.4f} "
                f"acc={m['accuracy']:.4f} ({info['train_seconds']:.2f}s, {info['best_iteration']} rounds)"
            )
        mean = {k: _mean_std([per_seed[str(s)][k] for s in config.seeds])[0] for k in METRICS}
        std = {k: _mean_std([per_seed[str(s)][k] for s in config.seeds])[1] for k in METRICS}
        first = self.train_sets[set_name][config.seeds[0]]
        return {
            "n_train": int(first.size),
            "per_seed": per_seed,
            "mean": mean,
            "std": std,
            "per_class_f1": {str(c): float(np.mean([r[int(c)] for r in per_class_runs])) for c in self.eval_labels},
            "train_seconds": float(np.mean([per_seed[str(s)]["train_seconds"] for s in config.seeds])),
            "classes_missing": self.classes_missing(first) if set_name != "random"
            else sorted({c for s in config.seeds for c in self.classes_missing(self.train_sets["random"][s])}),
        }


def _paired_delta(sets_out: dict, other: str, seeds) -> dict:
    """curated − other per seed, for each metric: mean, std and the per-seed differences."""
    out = {}
    for k in METRICS:
        diffs = [sets_out["curated"]["per_seed"][str(s)][k] - sets_out[other]["per_seed"][str(s)][k] for s in seeds]
        mu, sd = _mean_std(diffs)
        out[k] = {"mean": mu, "std": sd, "per_seed": diffs}
    return out


def run_evaluation(
    *,
    record_ids: np.ndarray,
    labels: np.ndarray,
    image_emb: np.ndarray,
    text_emb: np.ndarray,
    curate: Callable[[np.ndarray], np.ndarray],
    config: EvaluationConfig,
    category_names: dict[int, str] | None = None,
    model_name: str = "",
    meaningless: bool = False,
    progress: Callable[[str], None] | None = None,
    excluded_unlabelled: int = 0,
    groups: np.ndarray | None = None,
) -> EvaluationResult:
    """Train LightGBM on raw / curated / same-size random training sets and score them on one held-out test set.

    ``curate(train_idx)`` receives the (sorted) row indices of the training part only and must return a boolean
    keep-mask aligned with them. Labels are encoded over *all* classes, so a training set that lost a class still
    yields a classifier over every class (it just never predicts the lost one). ``groups``: duplicate groups, kept
    whole on one side of the test split (see stratified_test_split).
    """
    record_ids, labels, image_emb, text_emb = _check_inputs(record_ids, labels, image_emb, text_emb)
    say = progress or (lambda _msg: None)

    class_order = [int(c) for c in np.unique(labels)]
    n_classes = len(class_order)
    y = np.searchsorted(np.asarray(class_order), labels)  # encoded 0..K-1, consistent for every model

    train_idx, test_idx = stratified_test_split(y, config.test_fraction, config.split_seed, groups)
    if test_idx.size == 0:
        raise ValueError("the test split is empty: every class has a single row")
    y_test = y[test_idx]
    eval_enc = np.unique(y_test)
    eval_labels = np.asarray(class_order)[eval_enc]

    curated_idx = _curated_training_rows(curate, train_idx)
    n_raw, n_cur = int(train_idx.size), int(curated_idx.size)
    say(f"split: {n_raw} training rows, {test_idx.size} test rows; curation kept {n_cur}/{n_raw} training rows")
    train_sets = _training_sets(train_idx, curated_idx, config.seeds)

    # One parameter set, scaled to the raw training set, for all three sets: only the seed varies.
    base_params = lgbm_params(n_raw, n_classes, config)
    exp = _Experiment(labels=labels, y=y, class_order=class_order, train_idx=train_idx, test_idx=test_idx,
                      eval_labels=eval_labels, train_sets=train_sets, config=config, base_params=base_params, say=say,
                      groups=None if groups is None else np.asarray(groups))

    runs: dict[str, dict[str, dict[int, np.ndarray]]] = {}
    modality_metrics: dict[str, dict] = {}
    for modality in config.modalities:
        runs[modality], modality_metrics[modality] = exp.evaluate_modality(
            modality, _modality_features(modality, image_emb, text_emb))

    test_counts = {str(class_order[c]): int((y_test == c).sum()) for c in range(n_classes)}
    metrics = {
        "model": model_name,
        "meaningless": bool(meaningless),
        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()},
        "classes": class_order,
        "eval_classes": [int(c) for c in eval_labels],
        "std_convention": "sample standard deviation (ddof=1) over seeds",
        "lgbm_params": {k: v for k, v in base_params.items() if k != "seed"},
        "excluded_unlabelled": int(excluded_unlabelled),
        "split": {
            "n_total": int(labels.size),
            "n_train": n_raw,
            "n_test": int(test_idx.size),
            "test_fraction": config.test_fraction,
            "split_seed": config.split_seed,
            "test_ids_sha256": _sha256_ids(record_ids[test_idx]),
            "grouped_by_duplicates": groups is not None,
            "duplicate_groups": 0 if groups is None else int((np.bincount(np.unique(groups, return_inverse=True)[1])
                                                              > 1).sum()),
            "test_class_counts": test_counts,
            "classes_without_test_rows": [class_order[c] for c in range(n_classes) if c not in set(eval_enc)],
        },
        "curation": {
            "n_train_raw": n_raw,
            "n_curated": n_cur,
            "kept_fraction": n_cur / n_raw,
            "classes_lost": exp.classes_missing(curated_idx),
        },
        "modalities": modality_metrics,
    }
    verdict = _verdict(metrics, config, meaningless)
    metrics["verdict"] = verdict

    primary = config.modalities[0]
    confusion = confusion_matrix(labels[test_idx], runs[primary]["curated"][config.seeds[0]], labels=class_order)
    predictions = {
        "class_order": class_order,
        "eval_labels": eval_labels,
        "train_idx": train_idx,
        "test_idx": test_idx,
        "test_record_ids": record_ids[test_idx],
        "y_true": labels[test_idx],
        "curated_idx": curated_idx,
        "train_rows": train_sets,  # set -> seed -> row indices into the inputs
        "y_pred": runs,  # modality -> set -> seed -> predicted label codes for test_idx
    }
    result = EvaluationResult(
        metrics=_jsonable(metrics),
        verdict=verdict,
        markdown="",
        headline=_headline(metrics, config),
        confusion=confusion,
        class_order=class_order,
        predictions=predictions,
        category_names=dict(category_names) if category_names else None,
        meaningless=bool(meaningless),
    )
    from .evaluation_report import render_markdown  # the report reads this module's types: imported when needed

    result.markdown = render_markdown(result, plots=None)
    return result


# --------------------------------------------------------------------------------------------- reporting


def _fmt_delta(d: dict) -> str:
    return f"{d['mean']:+.3f} ± {d['std']:.3f}"


def _verdict(metrics: dict, config: EvaluationConfig, meaningless: bool) -> str:
    """One line: curated vs random (the fair comparison) first, then vs raw; says when Δ is within seed noise."""
    mod = metrics["modalities"][config.modalities[0]]
    sets = mod["sets"]
    dr, dw = mod["delta_vs_random"]["macro_f1"], mod["delta_vs_raw"]["macro_f1"]
    k = len(config.seeds)
    line = (
        f"curated (n={sets['curated']['n_train']}) vs random (n={sets['random']['n_train']}): "
        f"macro-F1 Δ = {_fmt_delta(dr)} ({k} seed{'s' if k != 1 else ''}); "
        f"vs raw (n={sets['raw']['n_train']}): Δ = {_fmt_delta(dw)}"
    )
    if k > 1:
        # two standard errors of the paired per-seed difference: a rough, stated bar, not a significance test
        se = dr["std"] / math.sqrt(k)
        if abs(dr["mean"]) <= 2 * se or dr["mean"] == 0:
            line += " — within seed noise: no evidence that curation beats a same-size random subset"
        elif dr["mean"] > 0:
            line += " — curation beats a same-size random subset"
        else:
            line += " — curation does worse than a same-size random subset"
    if len(config.modalities) > 1 or config.modalities[0] != "image+text":
        line += f" [{config.modalities[0]} features]"
    if meaningless:
        line += f" — {MEANINGLESS_NOTE}"
    return line


def _headline(metrics: dict, config: EvaluationConfig) -> dict[str, float]:
    """Flat floats for Dagster numeric metadata; the first modality is unprefixed, others get '<modality>_'."""
    out: dict[str, float] = {
        "n_train_raw": float(metrics["curation"]["n_train_raw"]),
        "n_curated": float(metrics["curation"]["n_curated"]),
        "n_test": float(metrics["split"]["n_test"]),
        "kept_fraction": float(metrics["curation"]["kept_fraction"]),
    }
    for i, modality in enumerate(config.modalities):
        prefix = "" if i == 0 else modality.replace("+", "_") + "_"
        mod = metrics["modalities"][modality]
        for set_name in TRAINING_SETS:
            for k in METRICS:
                out[f"{prefix}{set_name}_{k}"] = float(mod["sets"][set_name]["mean"][k])
            out[f"{prefix}{set_name}_train_seconds"] = float(mod["sets"][set_name]["train_seconds"])
        out[f"{prefix}delta_vs_random"] = float(mod["delta_vs_random"]["macro_f1"]["mean"])
        out[f"{prefix}delta_vs_random_std"] = float(mod["delta_vs_random"]["macro_f1"]["std"])
        out[f"{prefix}delta_vs_raw"] = float(mod["delta_vs_raw"]["macro_f1"]["mean"])
        out[f"{prefix}delta_vs_raw_std"] = float(mod["delta_vs_raw"]["macro_f1"]["std"])
    return out


def _jsonable(obj):
    """Plain JSON types only; NaN/inf become null so metrics.json stays valid JSON."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        v = float(obj)
        return v if math.isfinite(v) else None
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


