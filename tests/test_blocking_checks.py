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
