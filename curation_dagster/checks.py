"""Data-quality gates. The checks are blocking: a failure stops every asset downstream in the run, so a curated
version is never published from clean data, embeddings or a curated set that failed its checks (publication is
the published_curated_version asset, downstream of the curated_products checks)."""

import dagster as dg
import numpy as np
import polars as pl

from .core.artifacts import STAGE_COUNTS_KEY, load_removals
from .core.embedding_set import EmbeddingSet
from .core.images import decode_many, file_sha256
from .core.system import available_cpus
from .assets._run_version import this_runs_staged_version
from .resources import CurationPaths


@dg.asset_check(asset="clean_products", blocking=True, description="record_id is unique.")
def clean_unique_record_id(clean_products: pl.DataFrame) -> dg.AssetCheckResult:
    dup = clean_products.filter(pl.col("record_id").is_duplicated())["record_id"].unique().to_list()
    return dg.AssetCheckResult(passed=not dup, metadata={"duplicated_ids": dg.MetadataValue.json(dup[:20]),
                                                          "n_duplicated": len(dup)})


@dg.asset_check(asset="clean_products", blocking=True, description="No designation is empty after cleaning.")
def clean_no_empty_designation(clean_products: pl.DataFrame) -> dg.AssetCheckResult:
    empty = clean_products.filter(pl.col("designation").is_null() | (pl.col("designation").str.strip_chars() == ""))
    return dg.AssetCheckResult(passed=empty.is_empty(), metadata={"n_empty": empty.height,
                                                                  "ids": dg.MetadataValue.json(empty["record_id"].head(20).to_list())})


@dg.asset_check(asset="clean_products", blocking=True,
                description="Every image file of a clean row exists and decodes completely: its bytes are those "
                            "clean_products decoded (sha256), else it is decoded again.")
def clean_images_decode(clean_products: pl.DataFrame) -> dg.AssetCheckResult:
    from pathlib import Path

    # clean_products decoded every kept image fully and recorded its sha256 (after any RGB conversion): a file with
    # the same bytes decodes the same, so only files whose bytes differ are decoded again. A second full decode of
    # every image cost ~1 min at 85k rows on 2 cores; hashing costs seconds.
    has_sha = "image_sha256" in clean_products.columns
    rows = clean_products.select("record_id", "image_path",
                                 pl.col("image_sha256") if has_sha else pl.lit(None, pl.Utf8).alias("image_sha256"))
    bad, redo = [], []
    for rid, p, sha in rows.iter_rows():
        if p is None or not Path(p).is_file():
            bad.append((rid, "missing"))
        elif sha is None or file_sha256(Path(p)) != sha:
            redo.append((rid, p, sha is not None))
    results = decode_many([p for _, p, _ in redo], workers=available_cpus(), convert_to_rgb=False)
    for (rid, _, had_sha), r in zip(redo, results):
        if not r.ok:
            bad.append((rid, r.reason))
        elif had_sha:  # decodes, but is not the image clean_products checked (and the embedding cache is keyed by)
            bad.append((rid, "changed since clean_products decoded it: materialize clean_products again"))
    return dg.AssetCheckResult(passed=not bad, metadata={"n_bad": len(bad), "decoded_again": len(redo),
                                                         "bad": dg.MetadataValue.json([list(b) for b in bad[:20]])})


@dg.asset_check(asset="clean_products", blocking=True, additional_ins={"product_images": dg.AssetIn(),
                                                                       "clean_rejections": dg.AssetIn()},
                description="Rows in (product_images) = clean rows + rejected rows, with no id in both.")
def clean_counts_add_up(clean_products: pl.DataFrame, product_images: pl.DataFrame,
                        clean_rejections: pl.DataFrame) -> dg.AssetCheckResult:
    n_in, n_out, n_rej = product_images.height, clean_products.height, clean_rejections.height
    overlap = set(clean_products["record_id"].to_list()) & set(clean_rejections["record_id"].to_list())
    accounted = set(clean_products["record_id"].to_list()) | set(clean_rejections["record_id"].to_list())
    lost = set(product_images["record_id"].to_list()) - accounted
    return dg.AssetCheckResult(passed=(n_in == n_out + n_rej) and not overlap and not lost,
                               metadata={"in": n_in, "out": n_out, "rejected": n_rej, "in_both": len(overlap),
                                         "unaccounted": len(lost)})


@dg.asset_check(asset="clip_embeddings", blocking=True, additional_ins={"clean_products": dg.AssetIn()},
                description="Embeddings are finite, unit-norm (±1e-3), of the model's dimension, one per clean row.")
def embeddings_valid(clip_embeddings: EmbeddingSet, clean_products: pl.DataFrame) -> dg.AssetCheckResult:
    problems = []
    for name, m in (("image", clip_embeddings.image), ("text", clip_embeddings.text)):
        if m.dtype != np.float32:
            problems.append(f"{name}: dtype {m.dtype}")
        if not np.isfinite(m).all():
            problems.append(f"{name}: {int((~np.isfinite(m)).any(axis=1).sum())} rows not finite")
            continue
        norms = np.linalg.norm(m, axis=1)
        off = int((np.abs(norms - 1) > 1e-3).sum())
        if off:
            problems.append(f"{name}: {off} rows not unit norm (min {norms.min():.4f}, max {norms.max():.4f})")
        if m.ndim != 2 or m.shape[1] != int(clip_embeddings.meta.get("dim", -1)):
            problems.append(f"{name}: shape {m.shape} != model dim {clip_embeddings.meta.get('dim')}")
    if sorted(clip_embeddings.ids["record_id"].to_list()) != sorted(clean_products["record_id"].to_list()):
        problems.append("embedded record ids differ from clean_products")
    return dg.AssetCheckResult(passed=not problems, metadata={"problems": dg.MetadataValue.json(problems),
                                                              "rows": len(clip_embeddings), "dim": clip_embeddings.dim})


@dg.asset_check(asset="curated_products", blocking=True,
                description="No two rows of this run's curated version are duplicates by the thresholds used "
                            "(image and text cosine).")
def curated_no_duplicates_left(context: dg.AssetCheckExecutionContext, curated_products: pl.DataFrame,
                               paths: CurationPaths) -> dg.AssetCheckResult:
    from .core.dedup import max_cross_similarity

    version = this_runs_staged_version(context.run, paths.artifacts)
    d = version.manifest["thresholds"]["dedup"]
    meta, failed = {}, []
    for name, emb, thr in (("image", version.image_emb, d["image_threshold"]),
                           ("text", version.text_emb, d["text_threshold"])):
        if thr is None or len(emb) < 2:
            continue
        top = float(max_cross_similarity(emb))
        meta[f"max_{name}_similarity"] = top
        meta[f"{name}_threshold"] = float(thr)
        if top >= thr:
            failed.append(name)
    return dg.AssetCheckResult(passed=not failed, metadata={**meta, "failed": dg.MetadataValue.json(failed),
                                                            "version": version.version})


@dg.asset_check(asset="curated_products", blocking=True, additional_ins={"clean_products": dg.AssetIn()},
                description="clean = curated + removed, and this run's version holds exactly the curated rows.")
def curated_counts_add_up(context: dg.AssetCheckExecutionContext, curated_products: pl.DataFrame,
                          clean_products: pl.DataFrame, paths: CurationPaths) -> dg.AssetCheckResult:
    # The removals are the ones this run's version carries, not the curation_removals asset: a run that selects
    # curated_products alone (re-curating with new thresholds) does not rewrite that table, and the check then
    # compared this run's rows with the previous run's removals (a consistent run refused, or a wrong one passed).
    version = this_runs_staged_version(context.run, paths.artifacts)
    removals = load_removals(version)
    counts = version.manifest.get(STAGE_COUNTS_KEY) or {}
    removed = removals.height if removals is not None else \
        int(counts.get("removed_misaligned", 0)) + int(counts.get("removed_duplicate", 0))
    ok = clean_products.height == curated_products.height + removed
    if removals is not None:  # and no row is both kept and removed
        ok = ok and not set(removals["record_id"].to_list()) & set(curated_products["record_id"].to_list())
    same = version.records["record_id"].to_list() == curated_products["record_id"].to_list()
    return dg.AssetCheckResult(passed=ok and same, metadata={
        "clean": clean_products.height, "curated": curated_products.height,
        "removed": removed, "artifact_matches": same, "version": version.version})


ALL_CHECKS = [clean_unique_record_id, clean_no_empty_designation, clean_images_decode, clean_counts_add_up,
              embeddings_valid, curated_no_duplicates_left, curated_counts_add_up]
