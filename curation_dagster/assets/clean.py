"""clean_products: rows whose image fully decodes and whose text is usable, cleaned; rejections beside them."""

from typing import Optional

import dagster as dg
import polars as pl
from pydantic import Field

from ..core.cleaning import clean_products as run_cleaning
from ..core.images import DEFAULT_MAX_PIXELS
from ..core.progress import ProgressLog
from ..core.thumbs import DEFAULT_MIN_SIDE, THUMB_DIRNAME, Thumbnails
from ..resources import CurationPaths
from ._metadata import md_table, rejection_metadata, selected_outputs


class CleanConfig(dg.Config):
    max_image_pixels: int = Field(default=DEFAULT_MAX_PIXELS,
                                  description="Decompression-bomb limit (width × height); larger images are rejected.")
    workers: Optional[int] = Field(default=None, description="Decode threads (default: CPU count).")
    thumbnails: bool = Field(default=True, description=(
        "Also write each image's model-input thumbnail (a small baseline JPEG under <artifacts>/thumbs/, from the "
        "decode cleaning does anyway): the embedding stage decodes it ~7x faster than the progressive original."))
    thumbnail_min_side: int = Field(default=DEFAULT_MIN_SIDE, ge=32, description=(
        "Thumbnails keep at least this many pixels on their short side; a model that needs more reads the "
        "original."))
    prune_thumbnails: bool = Field(default=True, description=(
        "Delete the thumbnails no clean row names any more (products left the sample, photos changed, another "
        "thumbnail_min_side): without it the thumbnail folder only grows."))


@dg.multi_asset(
    outs={
        "clean_products": dg.AssetOut(
            description="Rows whose image decodes completely (non-RGB converted to RGB and recorded) and whose "
                        "designation is usable; designation/description stripped of HTML, mojibake repaired (ftfy), "
                        "NFC, whitespace collapsed. Raw text kept in *_raw columns. thumb_path: the image's "
                        "model-input thumbnail (core/thumbs.py), which clip_embeddings decodes instead.",
            kinds={"polars", "pillow"}, is_required=False),
        "clean_rejections": dg.AssetOut(
            description="Rows removed by cleaning, one each: record_id, stage, reason, detail.",
            kinds={"polars"}, is_required=False),
    },
    group_name="ingest",
    can_subset=True,
)
def clean_products(context: dg.AssetExecutionContext, config: CleanConfig, paths: CurationPaths,
                   product_images: pl.DataFrame):
    import os

    workers = config.workers or os.cpu_count() or 2

    progress = ProgressLog(context.log.info, "decoded", "images")
    thumbs = Thumbnails(paths.artifacts / THUMB_DIRNAME, config.thumbnail_min_side) if config.thumbnails else None
    result = run_cleaning(product_images, max_pixels=config.max_image_pixels, workers=workers, progress=progress,
                          thumbs=thumbs, prune_thumbs=config.prune_thumbnails)
    context.log.info(f"cleaning: {result.counts}")
    meta = rejection_metadata(result.rejections, result.counts["in"], result.counts["clean"])
    meta["converted_to_rgb"] = dg.MetadataValue.int(result.counts["converted_to_rgb"])
    meta["thumbnails"] = dg.MetadataValue.int(int(result.clean["thumb_path"].is_not_null().sum()))
    if "thumbnails_pruned" in result.counts:
        meta["thumbnails_pruned"] = dg.MetadataValue.int(result.counts["thumbnails_pruned"])
    meta["preview"] = dg.MetadataValue.md(md_table(result.clean.select("record_id", "prdtypecode", "designation",
                                                                       "description"), 10))
    yield from selected_outputs(context, [
        dg.Output(result.clean, output_name="clean_products", metadata=meta),
        dg.Output(result.rejections, output_name="clean_rejections",
                  metadata={"rows": dg.MetadataValue.int(result.rejections.height)})])
