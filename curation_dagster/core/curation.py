"""The curation stage: embedding-space deduplication and the cross-modal alignment filter, decided together.

How, and why:
- the duplicate groups are found once (core/dedup.py); a provisional keeper per group (a labelled row before an
  unlabelled copy, then the best-aligned) gives the set of *distinct* content, and the alignment thresholds (a
  percentile cut per class) are measured over it: 500 copies of one spam listing must not count 500 times;
- each group then keeps the member that passes its own class's threshold (then: labelled, best-aligned, lowest
  record_id), so a group is never wiped out while one member would pass: picking the best raw score first could
  keep a row that its class then cuts, after its copy in another class, which passes, was already dropped;
- each removed row gets one honest reason: a copy of a kept row is ``duplicate`` (``duplicate_of`` names the
  kept row); a row that fails its threshold is ``misaligned`` — also every member of a group none of whose members
  passes (a removal never points at a row that is not in the corpus).
The same function runs on the full clean set (the published artifact) and, in the evaluation, on the training part
only, so the experiment measures exactly what the pipeline does.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import polars as pl

from .alignment import AlignmentPolicy, alignment_filter, alignment_scores, thresholds_per_row, unlabelled_mask
from .dedup import DedupConfig, duplicate_graph, pick_keepers

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
    graph = duplicate_graph(image_emb, text_emb, image_sha256, record_ids, dedup, progress=progress)
    labelled = ~unlabelled_mask(labels) if n else np.zeros(0, bool)

    distinct = np.flatnonzero(pick_keepers(graph, scores, prefer=labelled).keep)  # provisional keepers
    decision = alignment_filter(scores[distinct], labels[distinct], policy)
    threshold_row = thresholds_per_row(labels, decision, scores[distinct], policy)
    passes = scores.astype(np.float32) >= threshold_row  # float32 on both sides, as alignment_filter compares
    dd = pick_keepers(graph, scores, prefer=2 * passes + labelled)

    kept_passes = passes[dd.keeper] if n else np.zeros(0, bool)
    keep = dd.keep & passes
    misaligned = ~passes & (dd.keep | ~kept_passes)  # a group none of whose members passes: all misaligned
    dup = ~dd.keep & kept_passes
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
                      "used": {str(k): float(v) for k, v in decision.thresholds.items()},
                      "measured_over": "distinct rows (one per duplicate group)"},
        "dedup": {**dedup.to_dict(), "edges": dict(dd.n_edges)},
    }
    return CurationResult(keep=keep, alignment_score=scores.astype(np.float32), dup_group=dd.dup_group,
                          removals=removals, thresholds=thresholds, counts=counts, dedup_search=dict(dd.search))
