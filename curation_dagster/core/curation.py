"""The curation stage: embedding-space deduplication, then the cross-modal alignment filter.

Order (dedup first, then alignment), and why:
- the percentile cut of the alignment filter is then measured over *distinct* content: 500 copies of one spam
  listing would otherwise count 500 times and move the threshold;
- each removed row gets one honest reason: a copy is recorded as ``duplicate_of`` the member that was kept (the
  best-aligned of its group), a row with no copy that fails the alignment cut as ``misaligned``;
- the kept member of a group is the best-aligned one, so dedup never keeps a worse pair than alignment-first would.
The same function runs on the full clean set (the published artifact) and, in the evaluation, on the training part
only, so the experiment measures exactly what the pipeline does.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import polars as pl

from .alignment import AlignmentPolicy, alignment_filter, alignment_scores
from .dedup import DedupConfig, find_duplicates

REMOVAL_SCHEMA = {
    "record_id": pl.Int64,
    "stage": pl.Utf8,
    "reason": pl.Utf8,          # misaligned | duplicate
    "detail": pl.Utf8,
    "alignment_score": pl.Float32,
    "threshold": pl.Float32,     # alignment threshold applied (misaligned rows)
    "duplicate_of": pl.Int64,    # kept record (duplicate rows)
    "similarity": pl.Float32,    # evidence of the duplicate link
    "evidence": pl.Utf8,         # image | text | sha256
}


@dataclass
class CurationResult:
    keep: np.ndarray                  # bool [n]
    alignment_score: np.ndarray       # float32 [n]
    dup_group: np.ndarray             # int64 [n]
    removals: pl.DataFrame            # one row per removed record, REMOVAL_SCHEMA
    thresholds: dict = field(default_factory=dict)
    counts: dict = field(default_factory=dict)
    dedup_search: dict = field(default_factory=dict)


def curate(record_ids: np.ndarray, labels: np.ndarray, image_emb: np.ndarray, text_emb: np.ndarray,
           image_sha256: Sequence[str | None] | None, *, policy: AlignmentPolicy, dedup: DedupConfig,
           progress: Callable | None = None) -> CurationResult:
    record_ids = np.asarray(record_ids, dtype=np.int64)
    labels = np.asarray(labels)
    n = len(record_ids)
    scores = alignment_scores(image_emb, text_emb)
    dd = find_duplicates(image_emb, text_emb, image_sha256, scores, record_ids, dedup, progress=progress)

    unique_idx = np.flatnonzero(dd.keep)
    decision = alignment_filter(scores[unique_idx], labels[unique_idx], policy)
    aligned = np.zeros(n, dtype=bool)
    aligned[unique_idx[decision.keep]] = True
    threshold_row = np.full(n, np.nan, dtype=np.float32)
    threshold_row[unique_idx] = decision.threshold_per_row

    keep = dd.keep & aligned
    misaligned = dd.keep & ~aligned
    dup = ~dd.keep
    rows = []
    for i in np.flatnonzero(misaligned):
        rows.append({"record_id": int(record_ids[i]), "stage": "curate", "reason": "misaligned",
                     "detail": f"alignment score {scores[i]:.4f} < threshold {threshold_row[i]:.4f}",
                     "alignment_score": float(scores[i]), "threshold": float(threshold_row[i]),
                     "duplicate_of": None, "similarity": None, "evidence": None})
    for i in np.flatnonzero(dup):
        rows.append({"record_id": int(record_ids[i]), "stage": "curate", "reason": "duplicate",
                     "detail": f"duplicate of {int(dd.duplicate_of[i])} ({dd.reason[i]} similarity "
                               f"{float(dd.similarity[i]):.4f})",
                     "alignment_score": float(scores[i]), "threshold": None,
                     "duplicate_of": int(dd.duplicate_of[i]), "similarity": float(dd.similarity[i]),
                     "evidence": str(dd.reason[i])})
    removals = pl.DataFrame(rows, schema=REMOVAL_SCHEMA) if rows else pl.DataFrame(schema=REMOVAL_SCHEMA)
    counts = {"in": n, "curated": int(keep.sum()), "removed_misaligned": int(misaligned.sum()),
              "removed_duplicate": int(dup.sum())}
    if counts["in"] != counts["curated"] + counts["removed_misaligned"] + counts["removed_duplicate"]:
        raise RuntimeError(f"curation lost rows: {counts}")
    thresholds = {
        "alignment": {"policy": policy.to_dict(),
                      "used": {str(k): float(v) for k, v in decision.thresholds.items()}},
        "dedup": {**dedup.to_dict(), "edges": dict(dd.n_edges)},
    }
    return CurationResult(keep=keep, alignment_score=scores.astype(np.float32), dup_group=dd.dup_group,
                          removals=removals, thresholds=thresholds, counts=counts, dedup_search=dict(dd.search))
