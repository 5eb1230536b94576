"""clip_embeddings: CLIP image and text embeddings of every clean row, encoded only when not cached."""

import dagster as dg
import numpy as np
import polars as pl
from pydantic import Field

from ..core.embedding_cache import text_key
from ..core.embedding_set import EmbeddingSet
from ..core.progress import ProgressLog
from ..core.thumbs import image_sources
from ..core.text import clip_text
from ..resources import ClipEncoderResource, CurationPaths


class EmbeddingConfig(dg.Config):
    batch_size: int = Field(default=64, description="Images per forward pass (halved automatically on CUDA OOM).")
    include_description: bool = Field(
        default=False, description="Embed 'designation. description' instead of the designation alone "
                                   "(CLIP truncates to its maximum text length).")
    use_cache: bool = Field(default=True, description="Reuse embeddings cached by (model, image sha256 / text hash).")
    use_thumbnails: bool = Field(default=True, description=(
        "Decode the model-input thumbnails clean_products wrote (small baseline JPEGs, ~7x faster than the "
        "progressive originals) where they cover the model's input; off: always the original files."))


def embed_clean_rows(clean: pl.DataFrame, encoder, paths: CurationPaths, config: EmbeddingConfig,
                     log=None) -> tuple[EmbeddingSet, dict]:
    """Plain function behind the asset (also used per shard): returns the set and run statistics."""
    from ..core.embedding_cache import EmbeddingCache, embed_with_cache

    texts = [clip_text(d, s, config.include_description)
             for d, s in zip(clean["designation"].to_list(), clean["description"].to_list())]
    text_keys = [text_key(t) for t in texts]
    cache = EmbeddingCache(paths.artifacts / "embedding_cache", encoder.model_identity, encoder.dim) \
        if config.use_cache else None
    def plan(p: dict) -> None:
        if log:
            todo = p["images_to_encode"] + p["texts_to_encode"]
            log(f"{p['rows']} rows: {p['image_cache_hits']} images and {p['text_cache_hits']} texts from the cache; "
                f"encoding {p['images_to_encode']} images + {p['texts_to_encode']} texts = {todo} items"
                + (" (nothing to encode)" if not todo else ""))

    thumbs = clean["thumb_path"].to_list() if config.use_thumbnails and "thumb_path" in clean.columns else None
    image_paths, image_keys, from_thumbs = image_sources(clean["image_path"].to_list(),
                                                         clean["image_sha256"].to_list(), thumbs,
                                                         getattr(encoder, "images", None))
    if log and thumbs is not None:
        log(f"{from_thumbs} of {clean.height} images are read from their thumbnails (core/thumbs.py)")
    image_emb, text_emb, stats = embed_with_cache(
        encoder, cache, image_paths, image_keys, texts,
        batch_size=config.batch_size, progress=ProgressLog(log, "encoded", "items (images + texts)"), plan=plan)
    if log:
        log(f"embeddings done: {stats['image_cache_hits']} images and {stats['text_cache_hits']} texts from the "
            f"cache, {stats['images_encoded']} images and {stats['texts_encoded']} texts encoded in "
            f"{stats['encode_seconds']:.1f} s")
    ids = pl.DataFrame({"record_id": clean["record_id"], "image_sha256": clean["image_sha256"],
                        "text_sha256": text_keys})
    meta = {"model_name": encoder.model_name, "model_identity": encoder.model_identity,
            "meaningless": bool(encoder.meaningless), "dim": int(encoder.dim),
            "include_description": config.include_description, "device": encoder.device,
            "precision": getattr(encoder, "precision", "fp32"), "dtype": getattr(encoder, "dtype_used", ""),
            "family": getattr(encoder, "family", "clip"),
            "image_decode": getattr(getattr(encoder, "images", None), "decode", "full"),
            "images_from_thumbnails": from_thumbs}
    return EmbeddingSet(ids=ids, image=image_emb, text=text_emb, meta=meta), stats


@dg.asset(group_name="embed", kinds={"torch", "numpy"}, pool="gpu", io_manager_key="embeddings_io_manager",
          description="L2-normalised CLIP image and text embeddings (float32 .npy + id table) for every row of "
                      "clean_products, in its row order. Cached by (model identity, image sha256 / text hash): a "
                      "re-materialization encodes only new or changed rows. Runs in the 'gpu' pool (1 at a time).")
def clip_embeddings(context: dg.AssetExecutionContext, config: EmbeddingConfig, paths: CurationPaths,
                    encoder: ClipEncoderResource, clean_products: pl.DataFrame) -> dg.Output[EmbeddingSet]:
    enc = encoder.load()
    if enc.meaningless:
        context.log.warning(f"model {enc.model_name!r} has random weights: embeddings and every score derived "
                            "from them are meaningless (offline smoke run)")
    context.log.info(f"embedding {clean_products.height} rows (one image and one text each) with {enc.model_name} "
                     f"on {enc.device} ({getattr(enc, 'dtype_used', '')}); images: {enc.images.describe()}")
    emb, stats = embed_clean_rows(clean_products, enc, paths, config, log=context.log.info)
    finite = bool(np.isfinite(emb.image).all() and np.isfinite(emb.text).all())
    return dg.Output(emb, metadata={
        "rows": dg.MetadataValue.int(len(emb)),
        "dim": dg.MetadataValue.int(emb.dim),
        "model": dg.MetadataValue.text(enc.model_name),
        "model_identity": dg.MetadataValue.text(enc.model_identity),
        "meaningless_model": dg.MetadataValue.bool(bool(enc.meaningless)),
        "device": dg.MetadataValue.text(str(enc.device)),
        "dtype": dg.MetadataValue.text(str(getattr(enc, "dtype_used", ""))),
        **{k: dg.MetadataValue.text(v) for k, v in enc.images.describe().items()},
        "items_per_s": dg.MetadataValue.float(float(stats.get("items_per_s", 0.0))),
        "seconds": dg.MetadataValue.float(float(stats.get("seconds", 0.0))),
        "image_cache_hits": dg.MetadataValue.int(int(stats.get("image_cache_hits", 0))),
        "text_cache_hits": dg.MetadataValue.int(int(stats.get("text_cache_hits", 0))),
        "images_encoded": dg.MetadataValue.int(int(stats.get("images_encoded", 0))),
        "texts_encoded": dg.MetadataValue.int(int(stats.get("texts_encoded", 0))),
        "all_finite": dg.MetadataValue.bool(finite),
    })


# ----------------------------------------------------------------------------------------- opt-in sharding
# The sharded variant lives in its own code location (curation_dagster.definitions_sharded): a partitioned asset
# in the main graph would break `dagster asset materialize --select '*'`, which needs no partition argument.

import os as _os

N_SHARDS = int(_os.environ.get("CURATION_EMBED_SHARDS", "4") or 4)
shard_partitions = dg.StaticPartitionsDefinition([str(i) for i in range(N_SHARDS)])


def shard_of(record_ids: pl.Series, n_shards: int) -> pl.Series:
    """Stable shard assignment: record_id modulo the shard count (product ids are spread uniformly)."""
    return (record_ids % n_shards).cast(pl.Int64)


@dg.asset(group_name="embed", kinds={"torch", "numpy"}, pool="gpu", io_manager_key="embeddings_io_manager",
          partitions_def=shard_partitions,
          description="One shard of clip_embeddings (rows with record_id % N == shard). A backfill of all shards "
                      "spreads across processes (multiprocess executor) or pods (k8s_job_executor).")
def clip_embedding_shards(context: dg.AssetExecutionContext, config: EmbeddingConfig, paths: CurationPaths,
                          encoder: ClipEncoderResource, clean_products: pl.DataFrame) -> dg.Output[EmbeddingSet]:
    shard = int(context.partition_key)
    part = clean_products.filter(shard_of(clean_products["record_id"], N_SHARDS) == shard)
    enc = encoder.load()
    context.log.info(f"shard {shard}/{N_SHARDS}: encoding {part.height} rows with {enc.model_name}")
    emb, stats = embed_clean_rows(part, enc, paths, config, log=context.log.info)
    return dg.Output(emb, metadata={"rows": dg.MetadataValue.int(len(emb)), "shard": shard,
                                    "items_per_s": float(stats.get("items_per_s", 0.0))})


@dg.asset(name="clip_embeddings", group_name="embed", kinds={"numpy"}, io_manager_key="embeddings_io_manager",
          ins={"clip_embedding_shards": dg.AssetIn(partition_mapping=dg.AllPartitionMapping())},
          description="All shards of clip_embedding_shards assembled in clean_products row order.")
def clip_embeddings_from_shards(context: dg.AssetExecutionContext, clean_products: pl.DataFrame,
                                clip_embedding_shards: dict) -> dg.Output[EmbeddingSet]:
    missing = sorted(set(shard_partitions.get_partition_keys()) - set(clip_embedding_shards))
    if missing:
        raise RuntimeError(f"shards {missing} of clip_embedding_shards are not materialized: backfill all shards")
    merged = EmbeddingSet.concat([clip_embedding_shards[k] for k in sorted(clip_embedding_shards, key=int)])
    ordered = merged.select(clean_products["record_id"].to_list())
    return dg.Output(ordered, metadata={"rows": dg.MetadataValue.int(len(ordered)),
                                        "shards": dg.MetadataValue.int(len(clip_embedding_shards)),
                                        "dim": dg.MetadataValue.int(ordered.dim),
                                        "model": dg.MetadataValue.text(str(ordered.meta.get("model_name")))})
