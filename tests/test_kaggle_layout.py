"""The real Kaggle layout end to end: unlabelled products are curated, published and searchable; categories are
named without a categories.csv; the evaluation uses labelled rows only."""
from __future__ import annotations

import json

import polars as pl
import pytest

from curation_dagster.core.artifacts import load_version
from curation_dagster.core.rakuten import read_source
from kaggle_layout import kaggle_layout
from pipeline_helpers import materialize_all


@pytest.fixture(scope="module")
def kaggle_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("kaggle")
    split = kaggle_layout(root / "source")
    artifacts = root / "artifacts"
    result = materialize_all(root / "source", artifacts)
    return split, artifacts, result


def test_reader_keeps_the_unlabelled_test_part(tmp_path):
    split = kaggle_layout(tmp_path)
    read = read_source(tmp_path)
    assert read.rejections.height == 0
    p = read.products
    assert p.height == len(split["train"]) + len(split["test"])
    unlabelled = p.filter(pl.col("prdtypecode").is_null())
    assert sorted(unlabelled["record_id"].to_list()) == sorted(split["test"])
    assert set(unlabelled["source_file"]) == {"X_test_update.csv"}
    assert all("image_test" in s for s in unlabelled["source_image_path"])
    # No categories.csv: the official names ship with the package.
    labelled = p.filter(pl.col("prdtypecode").is_not_null())
    assert labelled["category"].null_count() == 0
    assert labelled.filter(pl.col("prdtypecode") == 2583)["category"][0] == "Equipement pour piscine"
    assert any("unlabelled" in n for n in read.notes)


def test_x_row_of_a_labelled_file_without_its_y_row_is_still_rejected(tmp_path):
    kaggle_layout(tmp_path)
    y = (tmp_path / "Y_train_CVw08PX.csv").read_text().splitlines()
    (tmp_path / "Y_train_CVw08PX.csv").write_text("\n".join(y[:-1]) + "\n")  # drop the last label
    read = read_source(tmp_path)
    assert read.rejections["reason"].to_list() == ["missing_label"]
    assert "has no row in Y_train_CVw08PX.csv" in read.rejections["detail"][0]


def test_unknown_codes_are_shown_as_the_code_and_reported(tmp_path):
    kaggle_layout(tmp_path)
    y = (tmp_path / "Y_train_CVw08PX.csv").read_text().splitlines()
    y[1] = y[1].split(",")[0] + ",99999"
    (tmp_path / "Y_train_CVw08PX.csv").write_text("\n".join(y) + "\n")
    read = read_source(tmp_path)
    assert read.unknown_codes == [99999]
    assert any("99999" in n for n in read.notes)
    assert read.products.filter(pl.col("prdtypecode") == 99999)["category"].to_list() == [None]


def test_a_categories_csv_in_the_source_overrides_the_shipped_names(tmp_path):
    kaggle_layout(tmp_path)
    (tmp_path / "categories.csv").write_text("prdtypecode,category\n2583,Piscines et spas\n")
    p = read_source(tmp_path).products
    assert p.filter(pl.col("prdtypecode") == 2583)["category"][0] == "Piscines et spas"
    assert p.filter(pl.col("prdtypecode") == 10)["category"][0] == "Livres anciens / occasion"  # others shipped


def test_whole_graph_curates_and_publishes_unlabelled_products(kaggle_run):
    split, artifacts, result = kaggle_run
    assert result.success
    assert all(e.passed for e in result.get_asset_check_evaluations())
    version = load_version(artifacts)
    recs = version.records
    unlabelled = recs.filter(pl.col("prdtypecode").is_null())
    assert unlabelled.height > 0 and set(unlabelled["record_id"]) <= set(split["test"])
    removals = result.output_for_node("curated_products", "curation_removals")
    # every test row is accounted for: published, or removed with a reason
    assert set(split["test"]) == set(unlabelled["record_id"]) | (set(split["test"]) & set(removals["record_id"]))
    thresholds = version.manifest["thresholds"]["alignment"]["used"]
    assert "unlabelled" in thresholds  # the class-free cut, recorded
    assert recs.filter(pl.col("prdtypecode").is_not_null())["category"].null_count() == 0
    # the evaluation used labelled rows only, and says so
    report_dir = artifacts / "reports" / version.version
    metrics = json.loads((report_dir / "metrics.json").read_text())
    assert metrics["excluded_unlabelled"] == len(split["test"])
    assert metrics["split"]["n_total"] == len(split["train"])
    assert "unlabelled rows" in (report_dir / "report.md").read_text()
