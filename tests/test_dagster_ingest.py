"""The ingest part of the graph through Dagster's own materialize(), on a damaged copy of real sample rows."""
from __future__ import annotations

import dagster as dg
import polars as pl
from PIL import Image

from curation_dagster.checks import ALL_CHECKS
from curation_dagster.definitions import ASSETS
from curation_dagster.resources import build_resources

INGEST = ["raw_products", "raw_rejections", "sampled_products", "product_images", "clean_products",
          "clean_rejections"]


def test_ingest_assets_materialize_and_counts_add_up(source_builder, tmp_path):
    b = source_builder(30)
    Image.open(b.image_path(b.rows[0])).convert("CMYK").save(b.image_path(b.rows[0]), format="JPEG")
    b.image_path(b.rows[1]).write_bytes(b"")
    b.rows[2]["designation"] = "<br>"
    b.write(x_rows=b.rows, y_rows=b.rows[:-1])  # last X row has no label
    resources = build_resources(data_dir=str(b.root), artifacts_dir=str(tmp_path / "artifacts"), model="tiny-random")
    result = dg.materialize([*ASSETS, *ALL_CHECKS], selection=INGEST, resources=resources,
                            run_config={"ops": {"sampled_products": {"config": {"per_class_cap": 100}}}})
    assert result.success
    raw = result.output_for_node("raw_products", "raw_products")
    raw_rej = result.output_for_node("raw_products", "raw_rejections")
    clean = result.output_for_node("clean_products", "clean_products")
    rej = result.output_for_node("clean_products", "clean_rejections")
    assert raw.height == 29 and raw_rej["reason"].to_list() == ["missing_label"]
    assert clean.height + rej.height == 29
    assert sorted(rej["reason"].to_list()) == ["empty_designation", "image_unreadable"]
    assert clean.filter(pl.col("converted_from_mode") == "CMYK").height == 1
    checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    assert checks == {"clean_unique_record_id": True, "clean_no_empty_designation": True,
                      "clean_images_decode": True, "clean_counts_add_up": True}
    mats = {e.asset_key.to_user_string(): e.materialization.metadata for e in result.get_asset_materialization_events()}
    assert mats["clean_products"]["rows_in"].value == 29
    assert mats["clean_products"]["rows_rejected"].value == 2
    assert mats["clean_products"]["rejected_by_reason"].value == {"empty_designation": 1, "image_unreadable": 1}
    assert mats["raw_products"]["rows_rejected"].value == 1
