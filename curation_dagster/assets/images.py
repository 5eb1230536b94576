"""product_images: each row's image gathered into the artifacts tree, with its hash, size, format and status."""

import dagster as dg
import polars as pl

from ..core.images import collect_images
from ..core.progress import ProgressLog
from ..resources import CurationPaths
from ._metadata import counts_by, md_table


@dg.asset(group_name="ingest", kinds={"polars", "pillow"},
          description="sampled_products plus each row's image, copied (cloned where the file system can) to "
                      "$CURATION_ARTIFACTS_DIR/images/{imageid}_{productid}.jpg; sha256, bytes, width, height, "
                      "format and status (ok | missing | unreadable). Rows are never dropped here.")
def product_images(context: dg.AssetExecutionContext, paths: CurationPaths,
                   sampled_products: pl.DataFrame) -> dg.Output[pl.DataFrame]:
    df = collect_images(sampled_products, paths.images, progress=ProgressLog(context.log.info, "collected", "images"))
    status = counts_by(df, "image_status")
    context.log.info(f"images {status}; actions {counts_by(df, 'image_action')}")
    problems = df.filter(pl.col("image_status") != "ok").select("record_id", "image_file", "image_status", "image_error")
    return dg.Output(df, metadata={
        "rows": dg.MetadataValue.int(df.height),
        "by_status": dg.MetadataValue.json(status),
        "by_action": dg.MetadataValue.json(counts_by(df, "image_action")),
        "by_format": dg.MetadataValue.json(counts_by(df.filter(pl.col("image_format").is_not_null()), "image_format")),
        "total_bytes": dg.MetadataValue.int(int(df["image_bytes"].fill_null(0).sum())),
        "images_dir": dg.MetadataValue.path(str(paths.images)),
        "problems": dg.MetadataValue.md(md_table(problems)),
    })
