"""raw_products: the source catalogue as one table (record_id = productid), with read rejections beside it."""

import dagster as dg
import polars as pl

from ..core.inbox import inbox_dir
from ..core.rakuten import LABEL_ONLY_REASONS, read_source
from ..resources import CurationPaths
from ._metadata import counts_by, md_table, rejection_metadata, selected_outputs


@dg.multi_asset(
    outs={
        "raw_products": dg.AssetOut(
            description="Every product row of the source (X_*.csv ⋈ Y_*.csv by row index; an X file without a Y "
                        "file gives unlabelled products) and of the API's inbox (`source` = dataset | api), with "
                        "category names and the resolved source image path. record_id = productid.",
            kinds={"polars"}, is_required=False),
        "raw_rejections": dg.AssetOut(
            description="Source rows that could not be read: bad ids, missing/invalid labels, duplicate productids, "
                        "labels without a product row. One row each, with the file and line.",
            kinds={"polars"}, is_required=False),
    },
    group_name="ingest",
    can_subset=True,
)
def raw_products(context: dg.AssetExecutionContext, paths: CurationPaths):
    result = read_source(paths.data, inbox_root=inbox_dir(paths.artifacts))
    products, rejections = result.products, result.rejections
    for note in result.notes:
        context.log.warning(note)
    product_rows_rejected = rejections.filter(~pl.col("reason").is_in(LABEL_ONLY_REASONS)).height
    if products.height + product_rows_rejected != result.n_source_rows:
        raise RuntimeError(f"row accounting broken: {result.n_source_rows} read != {products.height} + "
                           f"{product_rows_rejected}")
    context.log.info(f"read {result.n_source_rows} product rows from {paths.data}: {products.height} kept, "
                     f"{rejections.height} rejections {counts_by(rejections, 'reason')}")
    meta = rejection_metadata(rejections, result.n_source_rows, products.height)
    meta.update({
        "data_dir": dg.MetadataValue.path(str(paths.data)),
        "files": dg.MetadataValue.json(result.files),
        "num_classes": dg.MetadataValue.int(products["prdtypecode"].drop_nulls().n_unique()),
        "unlabelled_rows": dg.MetadataValue.int(products["prdtypecode"].null_count()),
        "by_source": dg.MetadataValue.json(counts_by(products, "source")),
        "codes_without_name": dg.MetadataValue.json(result.unknown_codes),
        "preview": dg.MetadataValue.md(md_table(products.select("record_id", "prdtypecode", "category",
                                                                "designation"), 10)),
    })
    yield from selected_outputs(context, [
        dg.Output(products, output_name="raw_products", metadata=meta),
        dg.Output(rejections, output_name="raw_rejections",
                  metadata={"rows": dg.MetadataValue.int(rejections.height),
                            "by_reason": dg.MetadataValue.json(counts_by(rejections, "reason"))})])
