"""curated_products: dedup + alignment filter over the clean rows, written as a complete but *unpublished* version.

Publishing is a separate asset (assets/publish.py) downstream of this asset's blocking checks, so a version that
fails a check is never served."""

from typing import Optional

import dagster as dg
import numpy as np
import polars as pl
from pydantic import Field

from ..core.alignment import AlignmentPolicy
from ..core.artifacts import PROBE_KEY, RECORD_COLUMNS, alignment_stats, build_probe, write_staged_version
from ..core.curation import curate
from ..core.dedup import DedupConfig
from ..core.embedding_set import EmbeddingSet
from ..core.plots import alignment_histogram
from ..core.text import clip_text
from ..core.tiny_clip import MEANINGLESS_NOTE
from ..resources import CurationPaths
from ._metadata import counts_by, image_md, md_table, selected_outputs


_A, _D = AlignmentPolicy(), DedupConfig()  # the one definition of each policy's defaults (core/)


class CurateConfig(dg.Config):
    """The Launchpad face of AlignmentPolicy and DedupConfig: defaults come from them, :meth:`policies` maps back."""

    drop_fraction: Optional[float] = Field(
        default=_A.drop_fraction,
        description="Alignment filter: drop this lowest fraction of alignment scores (percentile cut).")
    min_score: Optional[float] = Field(
        default=_A.min_score, description="Alignment filter: also drop every pair with cosine(image, text) under this value.")
    per_class: bool = Field(default=_A.per_class, description="Compute alignment thresholds within each prdtypecode "
                                                               "(rows without one get the class-free cut).")
    min_keep_per_class: int = Field(default=_A.min_keep_per_class,
                                    description="The per-class filter never leaves fewer rows than this.")
    image_dup_threshold: Optional[float] = Field(
        default=_D.image_threshold, description="Image-embedding cosine at or above which two rows are duplicates (empty: off).")
    text_dup_threshold: Optional[float] = Field(
        default=_D.text_threshold, description="Text-embedding cosine at or above which two rows are duplicates (empty: off). "
                                               "High by default: product series (e.g. magazine issues) share near-identical titles.")
    use_sha256: bool = Field(default=_D.use_sha256, description="Byte-identical images are duplicates.")
    knn_k: int = Field(default=_D.k, description="Neighbours searched per row in the duplicate graph.")
    exact_search_max: int = Field(default=_D.exact_max, description="Exact faiss search up to this many rows, IVF (PQ fast-scan + exact re-score) above (see benchmarks/bench_dedup.py for the crossover).")

    def policies(self) -> tuple[AlignmentPolicy, DedupConfig]:
        return (AlignmentPolicy(drop_fraction=self.drop_fraction, min_score=self.min_score, per_class=self.per_class,
                                min_keep_per_class=self.min_keep_per_class),
                DedupConfig(image_threshold=self.image_dup_threshold, text_threshold=self.text_dup_threshold,
                            use_sha256=self.use_sha256, k=self.knn_k, exact_max=self.exact_search_max))


def curated_records(clean: pl.DataFrame, keep: np.ndarray, scores: np.ndarray, dup_group: np.ndarray) -> pl.DataFrame:
    return clean.with_columns(
        pl.Series("alignment_score", scores, dtype=pl.Float32),
        pl.Series("dup_group", dup_group, dtype=pl.Int64),
    ).filter(pl.Series(keep)).select(RECORD_COLUMNS + [c for c in ("source",) if c in clean.columns])


def removals_for_review(removals: pl.DataFrame, clean: pl.DataFrame) -> pl.DataFrame:
    """Removals with what a reviewer needs: the removed row's text, class and image, and for a duplicate the same
    fields of the row it duplicates (kept, unless the alignment filter removed that one too)."""
    fields = clean.select("record_id", "designation", "description", "prdtypecode", "category", "image_file")
    kept = fields.select(pl.col("record_id").alias("duplicate_of"), pl.col("designation").alias("kept_designation"),
                         pl.col("image_file").alias("kept_image_file"))
    return removals.join(fields, on="record_id", how="left").join(kept, on="duplicate_of", how="left")


def _latest_rows(context: dg.AssetExecutionContext, key: str, field: str) -> Optional[int]:
    event = context.instance.get_latest_materialization_event(dg.AssetKey(key))
    if event is None or event.asset_materialization is None:
        return None
    value = event.asset_materialization.metadata.get(field)
    return int(value.value) if value is not None else None


@dg.multi_asset(
    outs={
        "curated_products": dg.AssetOut(
            description="The curated corpus: clean rows minus duplicates (faiss kNN graph over image/text embeddings "
                        "+ exact image sha256, best-aligned member kept) and minus misaligned pairs (lowest "
                        "cross-modal cosine). Written as an unpublished version under "
                        "`$CURATION_ARTIFACTS_DIR/curated/_staged/{version}/`; `published_curated_version` moves it "
                        "next to the served versions once the blocking checks pass.",
            kinds={"polars", "faiss"}, is_required=False),
        "curation_removals": dg.AssetOut(
            description="Every row curation removed, with its reason: misaligned (score, threshold) or duplicate "
                        "(duplicate_of, similarity, evidence).",
            kinds={"polars"}, is_required=False),
    },
    group_name="curate",
    can_subset=True,
)
def curated_products(context: dg.AssetExecutionContext, config: CurateConfig, paths: CurationPaths,
                     clean_products: pl.DataFrame, clip_embeddings: EmbeddingSet):
    emb = clip_embeddings.select(clean_products["record_id"].to_list())
    meaningless = bool(emb.meta.get("meaningless"))
    policy, dedup = config.policies()
    result = curate(clean_products["record_id"].to_numpy(), clean_products["prdtypecode"].to_numpy(),
                    emb.image, emb.text, clean_products["image_sha256"].to_list(), policy=policy, dedup=dedup)
    keep = result.keep
    records = curated_records(clean_products, keep, result.alignment_score, result.dup_group)
    counts = {
        "raw": _latest_rows(context, "raw_products", "rows_in"),
        "sampled": _latest_rows(context, "sampled_products", "rows_out"),
        "clean": clean_products.height,
        "removed_misaligned": result.counts["removed_misaligned"],
        "removed_duplicate": result.counts["removed_duplicate"],
        "curated": records.height,
    }
    manifest = {
        "model": emb.meta.get("model_name"),
        "model_identity": emb.meta.get("model_identity"),
        "family": emb.meta.get("family"),
        "precision": emb.meta.get("precision"),
        "dtype": emb.meta.get("dtype"),
        "meaningless": meaningless,
        "note": MEANINGLESS_NOTE if meaningless else "",
        "text_fields": "designation+description" if emb.meta.get("include_description") else "designation",
        "dagster_run_id": context.run_id,
        "thresholds": result.thresholds,
        "counts": counts,
        "order": "dedup, then alignment filter on the unique rows",
        # The exact strings embedded for a few rows: a reader re-embeds them to prove the vectors belong to the model.
        PROBE_KEY: build_probe([clip_text(d, s, bool(emb.meta.get("include_description")))
                                for d, s in records.select("designation", "description").iter_rows()]),
    }
    info = write_staged_version(paths.artifacts, records, emb.image[keep], emb.text[keep], manifest,
                                run_id=context.run_id, removals=removals_for_review(result.removals, clean_products),
                                images_from=paths.images)
    context.log.info(f"wrote curated version {info.version} (not published until its checks pass): {counts}")
    if meaningless:
        context.log.warning(MEANINGLESS_NOTE)

    plot = alignment_histogram(result.alignment_score, result.thresholds["alignment"]["used"],
                               paths.artifacts / "reports" / "curation" / f"alignment_{info.version}.png",
                               title=f"Alignment scores ({emb.meta.get('model_name')})", meaningless=meaningless)
    removals = result.removals
    scored = clean_products.select("record_id", "prdtypecode", "designation").with_columns(
        pl.Series("alignment_score", result.alignment_score))
    lowest = scored.sort("alignment_score").head(10)
    dups = removals.filter(pl.col("reason") == "duplicate").join(
        clean_products.select("record_id", "designation"), on="record_id").join(
        clean_products.select(pl.col("record_id").alias("duplicate_of"), pl.col("designation").alias("kept")),
        on="duplicate_of", how="left").select("record_id", "designation", "duplicate_of", "kept", "similarity",
                                              "evidence").head(10)
    examples = (("**" + MEANINGLESS_NOTE + "**\n\n") if meaningless else "") + \
        "### Lowest alignment scores\n\n" + md_table(lowest) + "\n\n### Duplicates removed\n\n" + md_table(dups)
    stats = alignment_stats(result.alignment_score)
    meta = {
        "version": dg.MetadataValue.text(info.version),
        "artifact_path": dg.MetadataValue.path(str(info.path)),
        "model": dg.MetadataValue.text(str(emb.meta.get("model_name"))),
        "meaningless_model": dg.MetadataValue.bool(meaningless),
        "rows_in": dg.MetadataValue.int(clean_products.height),
        "rows_curated": dg.MetadataValue.int(records.height),
        "removed_misaligned": dg.MetadataValue.int(counts["removed_misaligned"]),
        "removed_duplicate": dg.MetadataValue.int(counts["removed_duplicate"]),
        "kept_fraction": dg.MetadataValue.float(records.height / max(1, clean_products.height)),
        "stage_counts": dg.MetadataValue.json(counts),
        "thresholds": dg.MetadataValue.json(result.thresholds),
        "dedup_search": dg.MetadataValue.json(result.dedup_search),
        "alignment_score_stats": dg.MetadataValue.json(stats),
        "alignment_histogram": image_md(plot, "Alignment-score histogram with the thresholds used"),
        "examples": dg.MetadataValue.md(examples),
    }
    yield from selected_outputs(context, [
        dg.Output(records, output_name="curated_products", metadata=meta),
        dg.Output(removals, output_name="curation_removals",
                  metadata={"rows": dg.MetadataValue.int(removals.height),
                            "by_reason": dg.MetadataValue.json(counts_by(removals, "reason"))})])
