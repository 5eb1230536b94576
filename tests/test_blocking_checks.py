"""A failing blocking check stops everything downstream: no curated version is published from bad inputs."""
from __future__ import annotations

import os

import dagster as dg

from curation_dagster.core.artifacts import read_current_version_name
from pipeline_helpers import materialize_all


def test_failed_clean_check_blocks_embedding_and_publishing(source_builder, tmp_path):
    b = source_builder(12)
    b.write()
    artifacts = tmp_path / "artifacts"
    instance = dg.DagsterInstance.ephemeral()
    ingest = dg.AssetSelection.groups("ingest")
    first = materialize_all(b.root, artifacts, selection=ingest, instance=instance)
    assert first.success and read_current_version_name(artifacts) is None

    # A collected image is damaged after cleaning (a disk fault, a concurrent writer): the decode check must catch it.
    clean = first.output_for_node("clean_products", "clean_products")
    victim = clean["image_path"][0]
    data = open(victim, "rb").read()
    os.unlink(victim)  # a hard link to the source: replace it, don't write through it into the source tree
    open(victim, "wb").write(data[: len(data) // 3])

    downstream = dg.AssetSelection.groups("embed", "curate")
    selection = downstream | dg.AssetSelection.checks_for_assets("clean_products")
    result = materialize_all_no_raise(b.root, artifacts, selection, instance)
    assert not result.success
    checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    assert checks["clean_images_decode"] is False
    materialized = {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}
    assert "clip_embeddings" not in materialized and "curated_products" not in materialized
    assert read_current_version_name(artifacts) is None  # nothing was published


def materialize_all_no_raise(data_dir, artifacts, selection, instance):
    from curation_dagster.checks import ALL_CHECKS
    from curation_dagster.definitions import ASSETS
    from curation_dagster.resources import build_resources

    resources = build_resources(data_dir=str(data_dir), artifacts_dir=str(artifacts), model="tiny-random",
                                device="cpu")
    return dg.materialize([*ASSETS, *ALL_CHECKS], resources=resources, selection=selection, instance=instance,
                          raise_on_error=False)


def test_image_check_trusts_only_the_bytes_cleaning_decoded(tmp_path):
    """clean_images_decode hashes instead of decoding every image again: a file whose sha256 is the one clean_products
    recorded passes without a decode; a damaged file, a different (even valid) image, a missing file fail, each
    with its reason; a row without a recorded hash is decoded."""
    import shutil
    from pathlib import Path

    import polars as pl

    from curation_dagster.checks import clean_images_decode
    from curation_dagster.core.images import file_sha256

    src = sorted((Path(__file__).resolve().parents[1] / "data" / "sample" / "images" / "image_train").glob("*.jpg"))[:6]
    paths = []
    for i, f in enumerate(src[:5]):
        paths.append(tmp_path / f"{i}.jpg")
        shutil.copy(f, paths[-1])
    shas = [file_sha256(p) for p in paths]
    table = pl.DataFrame({"record_id": list(range(5)), "image_path": [str(p) for p in paths], "image_sha256": shas})

    ok = clean_images_decode(table)
    assert ok.passed and ok.metadata["decoded_again"].value == 0

    data = paths[1].read_bytes()
    paths[1].write_bytes(data[: len(data) // 3])  # damaged after cleaning
    shutil.copy(src[5], paths[2])  # replaced by another image that decodes fine
    paths[3].unlink()  # gone
    table = table.with_columns(pl.when(pl.col("record_id") == 4).then(None).otherwise(pl.col("image_sha256"))
                               .alias("image_sha256"))  # no recorded hash: decoded
    res = clean_images_decode(table)
    assert not res.passed
    bad = dict(map(tuple, res.metadata["bad"].data))
    assert bad == {1: "image_corrupt", 2: "changed since clean_products decoded it: materialize clean_products again",
                   3: "missing"}
    assert res.metadata["decoded_again"].value == 3  # rows 1, 2 (hash differs) and 4 (no hash)
