"""The cleaning stage: drop rows whose image does not decode or whose text is unusable, and normalise the rest.

Every input row ends in exactly one of the two outputs (clean table or rejections), so counts add up downstream.
"""
from __future__ import annotations

import os

from dataclasses import dataclass, field
from typing import Callable

import polars as pl

from .images import DEFAULT_MAX_PIXELS, decode_many
from .thumbs import Thumbnails
from .rejections import empty_rejections, make_rejections
from .text import clean_text, text_problem

STAGE = "clean"


@dataclass
class CleanResult:
    clean: pl.DataFrame
    rejections: pl.DataFrame
    counts: dict[str, int] = field(default_factory=dict)


def clean_products(df: pl.DataFrame, *, max_pixels: int = DEFAULT_MAX_PIXELS, workers: int = 4,
                   progress: Callable[[int, int], None] | None = None,
                   thumbs: Thumbnails | None = None, prune_thumbs: bool = False) -> CleanResult:
    """``thumbs``: write each clean image's model-input thumbnail from the decode this stage does anyway
    (core/thumbs.py); the ``thumb_path`` column names it (null without one). ``prune_thumbs``: ``df`` is the
    whole dataset, so thumbnails no clean row names are stale and are deleted (never for a subset of it)."""
    n_in = df.height
    paths = [p if s == "ok" else None for p, s in zip(df["image_path"].to_list(), df["image_status"].to_list())]
    if thumbs is not None:
        thumbs.clean_stale_temp()  # of a run killed while writing
    decoded = decode_many(paths, max_pixels=max_pixels, workers=workers, progress=progress, thumbs=thumbs)
    if any(d.thumb_written for d in decoded):
        os.sync()  # the new thumbnails were renamed into place without an fsync each: once for all of them

    reasons: list[str | None] = []
    details: list[str | None] = []
    converted: list[str | None] = []
    rewritten: list[str | None] = []
    new_size: list[tuple[int, int] | None] = []
    designations, descriptions = [], []
    for row, dec in zip(df.iter_rows(named=True), decoded):
        reason = detail = None
        if row["image_status"] == "missing":
            reason, detail = "image_missing", row["image_error"] or "image file not found"
        elif row["image_status"] == "unreadable":
            reason, detail = "image_unreadable", row["image_error"]
        elif not dec.ok:
            reason, detail = dec.reason, dec.detail
        designation = clean_text(row["designation"])
        description = clean_text(row["description"])
        problem = text_problem(designation)
        if problem:
            raw = (row["designation"] or "")[:80]
            text_detail = f"designation {raw!r} is empty after cleaning" if problem == "empty_designation" \
                else f"designation {raw!r} has no letters or digits after cleaning"
            if reason is None:
                reason, detail = problem, text_detail
            else:
                detail = f"{detail}; also {problem}"
        reasons.append(reason)
        details.append(f"{row['image_file']}: {detail}" if reason and reason.startswith("image") else detail)
        converted.append(dec.converted_from if dec.ok else None)
        rewritten.append(dec.rewritten if dec.ok else None)
        new_size.append(dec.size if dec.ok else None)
        designations.append(designation)
        descriptions.append(description)

    df = df.with_columns(
        pl.Series("_reason", reasons, dtype=pl.Utf8),
        pl.Series("_detail", details, dtype=pl.Utf8),
        pl.Series("converted_from_mode", converted, dtype=pl.Utf8),
        pl.Series("image_rewritten", rewritten, dtype=pl.Utf8),
        pl.Series("_new_sha256", [d.sha256 if d.ok and d.rewritten else None for d in decoded], dtype=pl.Utf8),
        pl.Series("_new_width", [z[0] if z else None for z in new_size], dtype=pl.Int64),
        pl.Series("_new_height", [z[1] if z else None for z in new_size], dtype=pl.Int64),
        pl.Series("thumb_path", [d.thumb if d.ok else None for d in decoded], dtype=pl.Utf8),
        pl.col("designation").alias("designation_raw"),
        pl.col("description").alias("description_raw"),
        pl.Series("designation", designations, dtype=pl.Utf8),
        pl.Series("description", descriptions, dtype=pl.Utf8),
    )
    rejected = df.filter(pl.col("_reason").is_not_null())
    rejections = make_rejections(rejected["record_id"].to_list(), STAGE, rejected["_reason"].to_list(),
                                 rejected["_detail"].to_list()) if rejected.height else empty_rejections()
    clean = df.filter(pl.col("_reason").is_null()).drop("_reason", "_detail")
    # A rewritten file has new bytes: its hash (the embedding cache key), size and dimensions must follow.
    if clean.height and clean["image_rewritten"].is_not_null().any():
        clean = clean.with_columns(
            pl.coalesce("_new_sha256", "image_sha256").alias("image_sha256"),  # decode_fully hashed the new bytes
            pl.when(pl.col("image_rewritten").is_not_null()).then(pl.lit("RGB"))
            .otherwise(pl.col("image_mode")).alias("image_mode"),
            pl.when(pl.col("image_rewritten").is_not_null()).then(pl.lit("JPEG"))
            .otherwise(pl.col("image_format")).alias("image_format"),
            pl.when(pl.col("image_rewritten").is_not_null())
            .then(pl.col("image_path").map_elements(lambda p: os.path.getsize(p), return_dtype=pl.Int64))
            .otherwise(pl.col("image_bytes")).alias("image_bytes"),
            pl.coalesce("_new_width", "image_width").alias("image_width"),
            pl.coalesce("_new_height", "image_height").alias("image_height"),
        )
    clean = clean.drop("_new_sha256", "_new_width", "_new_height")
    counts = {"in": n_in, "clean": clean.height, "rejected": rejections.height}
    counts.update({f"rejected_{k}": v for k, v in rejections.group_by("reason").len().iter_rows()})
    counts["converted_to_rgb"] = int(clean["converted_from_mode"].is_not_null().sum())
    counts["rewritten_as_jpeg"] = int(clean["image_rewritten"].is_not_null().sum())
    if counts["in"] != counts["clean"] + counts["rejected"]:
        raise RuntimeError(f"cleaning lost rows: {counts}")
    if thumbs is not None and prune_thumbs:
        counts["thumbnails_pruned"], counts["thumbnail_bytes_pruned"] = thumbs.prune(clean["thumb_path"].to_list())
    return CleanResult(clean=clean, rejections=rejections, counts=counts)
