"""sampled_products: a deterministic stratified sample by product type."""

from typing import Optional

import dagster as dg
import polars as pl
from pydantic import Field

from ..core.plots import class_distribution_chart
from ..core.sampling import SampleSpec, class_distribution, stratified_sample
from ..resources import CurationPaths
from ._metadata import image_md


class SampleConfig(dg.Config):
    max_rows: Optional[int] = Field(default=None, description="Total row budget; empty = every row.")
    per_class_cap: Optional[int] = Field(default=None, description="At most this many rows per prdtypecode.")
    min_per_class: int = Field(default=1, description="Rows guaranteed to every class when the budget allows.")
    seed: int = Field(default=0, description="Seed of the per-row hash that orders rows within a class.")


@dg.asset(group_name="ingest", kinds={"polars"},
          description="Deterministic stratified sample of raw_products by prdtypecode (every class stays present "
                      "when the budget allows). Rows not sampled are out of scope, not rejected.")
def sampled_products(context: dg.AssetExecutionContext, config: SampleConfig, paths: CurationPaths,
                     raw_products: pl.DataFrame) -> dg.Output[pl.DataFrame]:
    spec = SampleSpec(config.max_rows, config.per_class_cap, config.min_per_class, config.seed)
    sample = stratified_sample(raw_products, spec)
    before, after = class_distribution(raw_products), class_distribution(sample)
    context.log.info(f"sampled {sample.height} of {raw_products.height} rows over {len(after)}/{len(before)} classes")
    meta = {
        "rows_in": dg.MetadataValue.int(raw_products.height),
        "rows_out": dg.MetadataValue.int(sample.height),
        "classes_before": dg.MetadataValue.int(len(before)),
        "classes_after": dg.MetadataValue.int(len(after)),
        "class_distribution_before": dg.MetadataValue.json({str(k): v for k, v in before.items()}),
        "class_distribution_after": dg.MetadataValue.json({str(k): v for k, v in after.items()}),
        "spec": dg.MetadataValue.json(spec.__dict__),
    }
    names = {int(c): n for c, n in raw_products.select("prdtypecode", "category").unique().iter_rows()
             if c is not None and n}
    out = paths.artifacts / "reports" / "sampling" / f"class_distribution_{context.run_id[:8]}.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    meta["class_distribution_plot"] = image_md(
        class_distribution_chart(before, after, out, title="Rows per class: source vs sample", category_names=names))
    return dg.Output(sample, metadata=meta)
